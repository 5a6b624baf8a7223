"Exported encoders: the same features as the method's own encoder, through load_encoder and through timm itself."
import json, subprocess, sys
from pathlib import Path
import pytest
import timm
import torch

from folk_nb.data import create_loader
from folk_nb.export import encoders, export_encoder, load_encoder, read_export, EXPORT_FORMAT
from folk_nb.methods import create_method
from folk_nb.models import normalize_images
from folk_nb.trainer import Trainer, TrainConfig

pytestmark = pytest.mark.usefixtures('one_thread')

VIT = dict(model='vit_tiny_patch16_224', img_size=32, patch_size=4, model_kwargs=dict(depth=2))
RUNS = {   # name -> (method, options)
    'mfm': ('mfm', VIT),
    'folk': ('folk', VIT),
    'mae': ('mae', VIT),
    'moco_cifar': ('moco', dict(model='resnet18', img_size=32, cifar_stem=True, queue_size=64)),
    'moco_plain': ('moco', dict(model='resnet18', img_size=32, queue_size=64)),
}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "One training step of each run (so no encoder is timm's initialisation): name -> (method, checkpoint path)."
    out = {}
    for name, (method_name, kw) in RUNS.items():
        torch.manual_seed(0)
        method = create_method(method_name, **kw)
        loader = create_loader('samples', recipe=method.recipe, size=32, batch_size=4, epoch_size=4, device='cpu')
        run = tmp_path_factory.mktemp(name)
        Trainer(method, loader, TrainConfig(max_steps=1, lr=1e-2, out_dir=run, progress=False)).fit()
        out[name] = (method.eval(), run / 'checkpoints' / 'last.pt')
    return out


def features(model, x):
    with torch.no_grad(): return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize('name,encoder', [('mfm', 'backbone'), ('folk', 'backbone'), ('folk', 'teacher'),
                                          ('mae', 'backbone'), ('moco_cifar', 'backbone'), ('moco_cifar', 'momentum'),
                                          ('moco_plain', 'backbone')])
def test_load_encoder_gives_the_methods_own_features(trained, tmp_path, name, encoder):
    method, ckpt = trained[name]
    path = export_encoder(ckpt, tmp_path / 'enc.pt', encoder)
    x = normalize_images(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    want = features(encoders(method)[encoder].model, x)
    got = features(load_encoder(path).eval(), x)
    assert torch.equal(got, want)
    state, facts = read_export(path)
    assert facts['format'] == EXPORT_FORMAT and facts['encoder'] == encoder and facts['method'] == method.name
    assert facts['checkpoint']['step'] == 1 and facts['checkpoint']['path'] == str(ckpt)
    assert json.loads((tmp_path / 'enc.pt.json').read_text()) == facts             # the readable copy says the same
    assert sorted(p.name for p in tmp_path.iterdir()) == ['enc.pt', 'enc.pt.json']  # no temporary file left


@pytest.mark.parametrize('name', ['mfm', 'moco_plain'])
def test_timm_create_model_reads_the_file_itself(trained, tmp_path, name):
    method, ckpt = trained[name]
    path = export_encoder(ckpt, tmp_path / 'enc.pt')
    facts = read_export(path)[1]
    model = timm.create_model(facts['model'], pretrained=True, num_classes=0, **facts['timm_kwargs'],
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = normalize_images(torch.rand(2, 3, 32, 32))
    assert torch.equal(features(model, x), features(method.backbone.model, x))


def test_folk_teacher_and_student_are_different_exports(trained, tmp_path):
    _, ckpt = trained['folk']
    student = read_export(export_encoder(ckpt, tmp_path / 's.pt', 'backbone'))[0]
    teacher = read_export(export_encoder(ckpt, tmp_path / 't.pt', 'teacher'))[0]
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)       # the EMA lags the student after a step


def test_a_fresh_classifier_and_the_pretraining_normalisation(trained, tmp_path):
    path = export_encoder(trained['mfm'][1], tmp_path / 'enc.pt')
    model = load_encoder(path, num_classes=7)
    assert model(normalize_images(torch.rand(2, 3, 32, 32))).shape == (2, 7)
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['input_size'] == (3, 32, 32)
    with pytest.raises(ValueError, match='num_classes'): load_encoder(path, num_classes=-1)


def test_default_file_sits_beside_the_checkpoint(trained):
    _, ckpt = trained['moco_cifar']
    path = export_encoder(ckpt, encoder='momentum')
    assert path == ckpt.with_name('last_momentum_timm.pt') and path.is_file()
    assert read_export(path)[1]['timm_kwargs'] is None                          # the CIFAR stem is not a timm option


def test_bad_inputs_get_clear_errors(trained, tmp_path):
    method, ckpt = trained['mfm']
    with pytest.raises(ValueError, match=r"encoder must be one of 'backbone'"): export_encoder(ckpt, tmp_path / 'a.pt', 'teacher')
    with pytest.raises(ValueError, match='is the checkpoint itself'): export_encoder(ckpt, ckpt)
    with pytest.raises(ValueError, match='is a folder'): export_encoder(ckpt, tmp_path)
    with pytest.raises(ValueError, match='give the file to write'): export_encoder(method)
    with pytest.raises(TypeError, match='checkpoint path or a folk_nb Method'): export_encoder(42)
    with pytest.raises(ValueError, match='training checkpoint: export its encoder'): load_encoder(ckpt)
    with pytest.raises(FileNotFoundError, match='not found'): load_encoder(tmp_path / 'missing.pt')
    path = export_encoder(ckpt, tmp_path / 'enc.pt')
    (tmp_path / 'cut.pt').write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match='not a readable encoder file'): load_encoder(tmp_path / 'cut.pt')
    state, facts = read_export(path)
    state['blocks.0.attn.qkv.weight'] = state['blocks.0.attn.qkv.weight'][:10]
    torch.save(dict(state_dict=state, folk_nb=facts), tmp_path / 'wrong.pt')
    with pytest.raises(ValueError, match='do not fit'): load_encoder(tmp_path / 'wrong.pt')


def run_cli(*args):
    return subprocess.run([sys.executable, '-c', 'from folk_nb.export import export_command; export_command()', *args],
                          capture_output=True, text=True, timeout=300, env={'OMP_NUM_THREADS': '1', 'PATH': ''})


def test_cli_writes_the_file_and_its_timm_line_loads_it(trained, tmp_path):
    _, ckpt = trained['mfm']
    r = run_cli('--checkpoint', str(ckpt), '--out', str(tmp_path / 'enc.pt'))
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if 'timm.create_model(' in l)
    call = line[line.index('timm.create_model('):]
    model = eval(call, dict(timm=timm, NUM_CLASSES=5))                           # the printed instruction works
    assert model.head.out_features == 5


@pytest.mark.parametrize('args,message', [
    (['--checkpoint', 'missing.pt'], 'checkpoint not found'),
    (['--checkpoint', 'garbage.pt'], 'not a readable checkpoint'),
    (['--checkpoint', 'CKPT', '--encoder', 'momentum'], "encoder must be one of 'backbone'"),
])
def test_cli_errors_are_one_line(trained, tmp_path, args, message):
    (tmp_path / 'garbage.pt').write_bytes(b'not a checkpoint')
    args = [str(trained['mfm'][1]) if a == 'CKPT' else (str(tmp_path / a) if a.endswith('.pt') else a) for a in args]
    r = run_cli(*args)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.startswith('folk_nb_export: error: ') and message in r.stderr and r.stderr.count('\n') == 1
