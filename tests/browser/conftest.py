"""Session fixtures for the real-browser tests: Debian Chromium, one JupyterLab server, one Playwright browser.

Chromium missing: installed with apt-get when running as root; if it is still missing the tests are skipped with a
message, except under CI=true, where that is a failure. Run only these tests with `pytest tests/browser`, leave them
out with `pytest tests -m "not browser"`.
"""
import tempfile
from pathlib import Path

import pytest

from labdriver import ARTIFACTS, LabNotebook, LabServer, ensure_chromium, in_ci, launch_browser


def pytest_configure(config):
    config.addinivalue_line('markers', 'browser: drives JupyterLab in a real Chromium (slow; needs /usr/bin/chromium)')


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:          # every test in tests/browser is a browser test, marked or not
        if here in Path(item.path).resolve().parents: item.add_marker(pytest.mark.browser)


def _unavailable(msg: str):
    if in_ci(): pytest.fail(msg + ' (CI=true: a missing browser fails the run)', pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope='session')
def chromium() -> Path:
    "Path of the Chromium executable (installed on demand)."
    path, why = ensure_chromium()
    if path is None: _unavailable(why)
    return path


@pytest.fixture(scope='session')
def lab_server(chromium):
    "A JupyterLab on 127.0.0.1:<free port> with a random token, serving a temporary copy of nbs/."
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = LabServer().start()
    yield server
    server.stop()


@pytest.fixture(scope='session')
def browser_context(chromium, lab_server):
    "A headless Chromium context in a fresh profile folder; requests off 127.0.0.1 are refused and recorded."
    try: from playwright.sync_api import sync_playwright
    except ImportError as e: _unavailable(f'the playwright package is not installed ({e})')
    with tempfile.TemporaryDirectory(prefix='folk_nb_chromium_') as profile, sync_playwright() as p:
        ctx = launch_browser(p, chromium, Path(profile))
        yield ctx
        ctx.close()


@pytest.fixture
def open_notebook(browser_context, lab_server):
    "open_notebook('NN_name.ipynb') -> LabNotebook, opened and with its kernel idle; pages close after the test."
    pages = []

    def _open(name: str) -> LabNotebook:
        if not (lab_server.root / name).is_file(): pytest.fail(f'notebook {name} not found in nbs/', pytrace=False)
        nb = LabNotebook(browser_context, lab_server, name)
        pages.append(nb)
        return nb.open()
    yield _open
    for nb in pages: nb.close()
