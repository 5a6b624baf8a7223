"README.md mirrors nbs/index.ipynb (quarto, which would generate it, does not run here)."
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_index_cell_is_in_the_readme():
    readme = (ROOT / 'README.md').read_text()
    cells = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())['cells']
    text = lambda c: ''.join(c['source']).strip().replace('](../docs/', '](docs/')   # image paths are relative to each file
    missing = [text(c)[:60] for c in cells if text(c) not in readme]
    assert not missing, f"README.md is out of sync with nbs/index.ipynb; cells missing: {missing}"


def test_readme_names_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / 'README.md').read_text()
    assert 'make demo' in readme and 'make test' in readme
    assert 'make test' in (ROOT / '.ci' / 'run').read_text()


def test_readme_pictures_exist_and_stay_small():
    readme = (ROOT / 'README.md').read_text()
    pictures = re.findall(r'!\[[^\]]*\]\(([^)\s]+)\)', readme)
    assert len(pictures) >= 6, pictures                     # the explorers' and viewers' screenshots
    for pic in pictures:
        path = ROOT / pic
        assert path.is_file(), f'README.md shows {pic}, which does not exist'
        assert path.stat().st_size < 300_000, f'{pic} is {path.stat().st_size} bytes (tests/browser/readme_screenshots.py)'
