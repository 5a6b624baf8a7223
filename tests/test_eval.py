"""folk_nb.eval against independent slow references (plain Python / numpy / libjpeg) and its properties.

kNN predictions vs a per-query plain-Python vote; probes on separable and on shuffled data; few-shot subsets;
corruptions (shape, range, identity at severity 0, monotone distortion, JPEG vs libjpeg); feature extraction from a
dataset dict and from a loader; JSON records; checkpoint loading; `folk_nb_eval` end to end on a Trainer checkpoint.
"""
import importlib.util
import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from folk_nb.eval import (POOLS, FeaturePool, feature_fn, extract_features, knn_predict, knn_accuracy, few_shot_indices,
                          train_linear, evaluate_linear, linear_probe, fine_tune, CORRUPTIONS, SEVERITIES, NOISE_STD,
                          CONTRAST, JPEG_QUALITY, corrupt, jpeg_compress, jpeg_quant_table, robustness_probe, load_method,
                          RESULT_FIELDS, write_result, read_results, check_record, evaluate, main)
from folk_nb.models import create_backbone, normalize_images
from folk_nb.methods import Method, METHODS, create_method
from folk_nb.images import sample_images
from folk_nb.data import dataset_tensors

REPO = Path(__file__).resolve().parents[1]
TINY = dict(depth=1, embed_dim=32, num_heads=2)


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py: one intra-op thread in this module


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    return create_backbone('vit_tiny_patch16_224', img_size=32, patch_size=8, **{**TINY, **kw})


def clusters(n, d, c, sep=3.0, seed=0):
    "Gaussian clusters: features (n, d), labels (n,)."
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * sep
    y = torch.randint(0, c, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def psnr(a, b):
    return float((10 * torch.log10(1 / ((a.double() - b.double()) ** 2).mean((1, 2, 3)).clamp_min(1e-20))).mean())


# ------------------------------------------------------------------------------------------------ kNN
def knn_reference(train_f, train_y, test_f, k, temperature):
    "Per query: cosine to every training point (float64), k best, weighted votes in a dict; smallest class on ties."
    tr = np.asarray(train_f, dtype=np.float64)
    tr = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    preds, ambiguous = [], []
    for q in np.asarray(test_f, dtype=np.float64):
        q = q / np.linalg.norm(q)
        sims = [(float(np.dot(q, t)), i) for i, t in enumerate(tr)]
        sims.sort(key=lambda s: -s[0])
        kk = min(k, len(sims))
        votes = {}
        for s, i in sims[:kk]:
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0.0) + math.exp(s / temperature)
        best = max(votes.values())
        winners = sorted(c for c, v in votes.items() if v == best)
        preds.append(winners[0])
        ranked = sorted(votes.values(), reverse=True)
        close_vote = len(ranked) > 1 and ranked[0] - ranked[1] < 1e-4 * ranked[0]
        close_cut = kk < len(sims) and sims[kk - 1][0] - sims[kk][0] < 1e-5
        ambiguous.append(close_vote or close_cut)
    return np.array(preds), np.array(ambiguous)


@pytest.mark.parametrize('n,m,d,c,k,t', [(60, 25, 8, 3, 10, 0.1), (40, 20, 5, 4, 200, 0.1),   # k > N: all vote
                                         (80, 30, 16, 5, 25, 0.5), (30, 10, 4, 2, 1, 0.07)])
def test_knn_matches_plain_python_reference(n, m, d, c, k, t):
    g = torch.Generator().manual_seed(n + k)
    ftr, fte = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    # unbalanced classes so that k exceeds the size of some classes
    ytr = torch.tensor(np.random.default_rng(k).choice(c, size=n, p=np.arange(1, c + 1) / np.arange(1, c + 1).sum()))
    ref, amb = knn_reference(ftr.numpy(), ytr.numpy(), fte.numpy(), k, t)
    got = knn_predict(ftr, ytr, fte, k=k, temperature=t, num_classes=c, chunk=7).numpy()
    assert amb.mean() < 0.2
    np.testing.assert_array_equal(got[~amb], ref[~amb])
    yte = torch.randint(0, c, (m,), generator=g)
    acc = knn_accuracy(ftr, ytr, fte, yte, k=k, temperature=t)
    assert acc == pytest.approx(float((got == yte.numpy()).mean()))
    if not amb.any(): assert acc == pytest.approx(float((ref == yte.numpy()).mean()))


def test_knn_vote_ties_go_to_the_smaller_class_and_chunking_does_not_matter():
    # every training point appears twice, with labels 2 and 1: with k = 2 the nearest pair ties
    base = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    ftr = torch.cat([base, base])
    ytr = torch.cat([torch.full((10,), 2), torch.full((10,), 1)])
    q = base + 1e-3 * torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(knn_predict(ftr, ytr, q, k=2), torch.ones(10, dtype=torch.long))
    f, y = clusters(300, 16, 5, sep=0.5, seed=3)
    a = knn_predict(f[:200], y[:200], f[200:], k=30, chunk=1)
    b = knn_predict(f[:200], y[:200], f[200:], k=30, chunk=4096)
    assert torch.equal(a, b)


def test_knn_scale_invariant_separable_and_chance():
    f, y = clusters(1200, 32, 10, sep=3.0, seed=1)
    acc = knn_accuracy(f[:1000], y[:1000], f[1000:], y[1000:])
    assert acc > 0.98
    # cosine: rescaling each feature vector changes nothing
    s = torch.rand(1200, 1, generator=torch.Generator().manual_seed(2)) * 10 + 0.1
    assert knn_accuracy(f[:1000] * s[:1000], y[:1000], f[1000:] * s[1000:], y[1000:]) == acc
    g = torch.Generator().manual_seed(4)
    fr, yr = torch.randn(3000, 32, generator=g), torch.randint(0, 10, (3000,), generator=g)
    chance = knn_accuracy(fr[:2000], yr[:2000], fr[2000:], yr[2000:])
    assert abs(chance - 0.1) < 0.04   # 1000 test points: binomial sd ~0.0095


def test_knn_errors_name_the_argument():
    f, y = clusters(20, 4, 2)
    with pytest.raises(ValueError, match='train_labels must be class indices >= 0'):
        knn_accuracy(f, -torch.ones(20, dtype=torch.long), f, y)
    with pytest.raises(ValueError, match='k must be a positive integer'):
        knn_accuracy(f, y, f, y, k=0)
    with pytest.raises(ValueError, match='test_features must be'):
        knn_accuracy(f, y, f[:, :3], y)
    with pytest.raises(ValueError, match='num_classes must be an integer >= 2'):
        knn_accuracy(f, y, f, y, num_classes=1)


# ------------------------------------------------------------------------------------------------ probes
def test_linear_probe_separable_and_shuffled():
    f, y = clusters(1500, 32, 10, sep=3.0, seed=5)
    r = linear_probe(f[:1000], y[:1000], f[1000:], y[1000:], device='cpu', min_steps=150)
    assert r['top1'] > 0.99 and r['train_top1'] > 0.99
    assert r['n_train'] == 1000 and r['n_test'] == 500 and r['num_classes'] == 10
    shuffled = y[:1000][torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    r0 = linear_probe(f[:1000], shuffled, f[1000:], y[1000:], device='cpu', min_steps=150)
    assert abs(r0['top1'] - 0.1) < 0.06   # 500 test points: binomial sd ~0.013


def test_linear_classifier_standardises_with_train_statistics():
    f, y = clusters(200, 8, 3, seed=6)
    f = f * torch.arange(1, 9) * 100 + 50   # wildly different scales per dimension
    clf = train_linear(f, y, 3, epochs=1, min_steps=5, device='cpu')
    assert torch.allclose(clf.mean, f.mean(0)) and torch.allclose(clf.std, f.std(0, unbiased=False))
    assert clf.training is False


def test_few_shot_subset_is_balanced_seeded_and_the_right_size():
    # unbalanced classes: 500, 300, 120, 7 images
    y = torch.cat([torch.full((n,), c) for c, n in enumerate((500, 300, 120, 7))])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    for frac in (0.01, 0.1, 0.5, 1.0):
        idx = few_shot_indices(y, frac, seed=1)
        want = [max(1, math.floor(frac * n + 0.5)) for n in (500, 300, 120, 7)]
        assert torch.bincount(y[idx], minlength=4).tolist() == want
        assert len(idx) == sum(want) and len(set(idx.tolist())) == len(idx)
        assert torch.equal(idx, idx.sort().values)
        assert torch.equal(idx, few_shot_indices(y, frac, seed=1))
    assert not torch.equal(few_shot_indices(y, 0.1, seed=1), few_shot_indices(y, 0.1, seed=2))
    assert torch.equal(few_shot_indices(y, 1.0, seed=3), torch.arange(len(y)))
    # a seeded subset is a uniform draw within a class: over many seeds each image of class 3 is picked ~1/7 of the time
    picks = torch.zeros(len(y))
    for s in range(700): picks[few_shot_indices(y, 0.1, seed=s)] += 1
    c3 = picks[y == 3]
    assert c3.sum() == 700 and c3.min() > 60 and c3.max() < 145   # expected 100 each
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match='label_fraction must be in'):
            few_shot_indices(y, bad)


def test_fewshot_probe_uses_the_subset():
    f, y = clusters(2000, 16, 10, seed=7)
    r = linear_probe(f[:1500], y[:1500], f[1500:], y[1500:], label_fraction=0.1, device='cpu', min_steps=100)
    assert r['n_train'] == len(few_shot_indices(y[:1500], 0.1, 0)) and r['top1'] > 0.9


# ------------------------------------------------------------------------------------------------ corruptions
@pytest.fixture(scope='module')
def pictures():
    return sample_images(size=48)[:6]


@pytest.mark.parametrize('kind', CORRUPTIONS)
def test_corruption_keeps_shape_range_and_grows_with_severity(pictures, kind):
    x = pictures
    values = []
    for s in SEVERITIES:
        y = corrupt(x, kind, s, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1
        values.append(psnr(y, x))
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert corrupt(x, kind, 0) is x and corrupt(x, 'none', 3) is x
    odd = sample_images(size=37)[:2, :, :, :30]          # odd, non-square sizes work too
    assert corrupt(odd, kind, 2, torch.Generator().manual_seed(0)).shape == odd.shape


def test_corruption_formulas_against_numpy(pictures):
    x = pictures.double().float()
    for s in SEVERITIES:   # contrast: (x - m) c + m per image, m over all its pixels and channels
        xn = x.numpy().astype(np.float64)
        m = xn.mean(axis=(1, 2, 3), keepdims=True)
        ref = np.clip((xn - m) * CONTRAST[s - 1] + m, 0, 1)
        np.testing.assert_allclose(corrupt(x, 'contrast', s).numpy(), ref, atol=1e-5)
    flat = torch.full((4, 3, 64, 64), 0.5)   # mid grey: no clipping at severity 1 (6 sd)
    d = corrupt(flat, 'gaussian_noise', 1, torch.Generator().manual_seed(0)) - flat
    assert abs(d.mean().item()) < 3e-3 and abs(d.std().item() / NOISE_STD[0] - 1) < 0.02
    a = corrupt(x, 'gaussian_noise', 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, corrupt(x, 'gaussian_noise', 3, torch.Generator().manual_seed(5)))   # seeded
    # blur: keeps the mean of a flat image, smooths a random one
    assert torch.allclose(corrupt(flat, 'gaussian_blur', 5), flat, atol=1e-6)
    # blur: against a per-image numpy Gaussian (3-sigma kernel, reflect padding); sigma from ImageNet-C's 224 px
    # values scaled by the side, at least CIFAR-10-C's
    for side, sev in ((32, 1), (32, 5), (40, 3), (96, 4)):
        img = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        sigma = max((1, 2, 3, 4, 6)[sev - 1] * side / 224, (0.4, 0.6, 0.7, 0.8, 1.0)[sev - 1])
        half = math.ceil(3 * sigma)
        t = np.arange(-half, half + 1)
        w = np.exp(-0.5 * (t / sigma) ** 2); w /= w.sum()
        ref = np.empty((2, 3, side, side))
        for i in range(2):
            for c in range(3):
                p = np.pad(img[i, c].double().numpy(), half, mode='reflect')
                rows = np.stack([np.convolve(r, w, mode='valid') for r in p])           # (side + 2 half, side)
                ref[i, c] = np.stack([np.convolve(col, w, mode='valid') for col in rows.T]).T
        np.testing.assert_allclose(corrupt(img, 'gaussian_blur', sev).numpy(), np.clip(ref, 0, 1), atol=1e-5)


@pytest.mark.parametrize('size', [32, 45])
def test_jpeg_in_torch_agrees_with_libjpeg(size):
    x = (sample_images(size=size)[:6] * 255).round() / 255
    for q in (90, 50) + JPEG_QUALITY:
        ours, lib = jpeg_compress(x, q), jpeg_compress(x, q, backend='torchvision')
        assert psnr(ours, lib) > 35, q                        # far closer to libjpeg (~45 dB) than to the original (<34 dB)
        assert abs(psnr(ours, x) - psnr(lib, x)) < 0.2, q
    assert jpeg_quant_table(50)[0, 0] == 16 and jpeg_quant_table(100).max() == 1


def test_corruption_errors(pictures):
    with pytest.raises(ValueError, match='kind must be one of'):
        corrupt(pictures, 'fog', 1)
    with pytest.raises(ValueError, match='severity must be an integer 0..5'):
        corrupt(pictures, 'jpeg', 6)
    with pytest.raises(TypeError, match='floating-point'):
        corrupt((pictures * 255).byte(), 'contrast', 1)


# ------------------------------------------------------------------------------------------------ features
def test_feature_pools_match_the_tokens():
    bb = tiny_vit(reg_tokens=2).eval()
    x = sample_images(size=32)[:3]
    with torch.no_grad():
        tokens = bb.forward_features(normalize_images(x))
        P = bb.num_prefix_tokens
        assert P == 3
        assert torch.allclose(FeaturePool(bb, 'cls')(x), tokens[:, 0], atol=1e-6)
        assert torch.allclose(FeaturePool(bb, 'mean')(x), tokens[:, P:].mean(1), atol=1e-6)
        assert FeaturePool(bb, 'cls+mean')(x).shape == (3, 64)
        gap = tiny_vit(class_token=False, global_pool='avg').eval()
        assert torch.allclose(FeaturePool(gap, 'mean')(x), gap.pooled(normalize_images(x)), atol=1e-6)
    with pytest.raises(ValueError, match='needs a CLS token'):
        FeaturePool(gap, 'cls')


def test_extract_features_from_a_dict_and_from_a_loader_agree():
    from folk_nb.data import GPUDataLoader, ViewSpec, dataset_tensors
    data = dataset_tensors('samples', size=32)
    fn = FeaturePool(tiny_vit(), 'mean')
    fn.train()
    f1, y1 = extract_features(fn, data, 'cpu', batch_size=4)
    assert fn.training                                   # mode restored
    assert f1.dtype == torch.float32 and f1.shape == (14, 32) and torch.equal(y1, data['targets'])
    f0, _ = extract_features(fn, data, 'cpu', batch_size=512)
    assert torch.allclose(f0, f1, atol=1e-5)             # batch size does not matter
    whole = ViewSpec(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)    # the identity view
    loader = GPUDataLoader(data['images'], data['targets'], views=whole, batch_size=5, shuffle=False, drop_last=False)
    f2, y2 = extract_features(fn, loader, 'cpu')
    assert torch.equal(y2, y1) and torch.allclose(f2, f1, atol=1e-4)
    pairs = [(data['images'][i:i + 6], data['targets'][i:i + 6]) for i in range(0, 14, 6)]   # (x uint8, y) pairs
    f3, _ = extract_features(fn, pairs, 'cpu')
    assert torch.allclose(f3, f1, atol=1e-5)
    fb, _ = extract_features(fn, data, 'cpu', amp='bf16')      # bf16 autocast runs on CPU too
    assert fb.dtype == torch.float32 and torch.allclose(fb, f1, atol=0.1)
    # a model in eval mode: dropout off, so the features are deterministic
    fd = FeaturePool(tiny_vit(drop_rate=0.5, proj_drop_rate=0.5), 'mean')
    fd.train()
    assert torch.equal(extract_features(fd, data, 'cpu')[0], extract_features(fd, data, 'cpu')[0])
    with pytest.raises(ValueError, match="data dict must hold 'images'"):
        extract_features(fn, {'x': data['images']}, 'cpu')
    with pytest.raises(TypeError, match='data must be a dict'):
        extract_features(fn, data['images'], 'cpu')


def test_robustness_probe_table():
    data = {'images': (sample_images(size=32) * 255).round().byte(), 'targets': torch.arange(14)}
    fn = FeaturePool(tiny_vit(), 'mean')
    r = robustness_probe(fn, data, data, 'cpu', kinds=('contrast', 'jpeg'), severities=(1, 5), min_steps=60)
    assert r['clean_top1'] == 1.0
    assert set(r['top1']) == {'contrast', 'jpeg'} and set(r['top1']['jpeg']) == {'1', '5'}
    accs = [a for row in r['top1'].values() for a in row.values()]
    assert r['mean_corrupted_top1'] == pytest.approx(float(np.mean(accs)))
    assert r['top1']['contrast']['5'] <= r['top1']['contrast']['1']
    with pytest.raises(ValueError, match='kinds must be chosen from'):
        robustness_probe(fn, data, data, 'cpu', kinds=('fog',))


def test_fine_tune_learns_and_leaves_the_encoder_untouched():
    data = {'images': (sample_images(size=32) * 255).round().byte(), 'targets': torch.arange(14)}
    bb = tiny_vit(seed=1)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    batches = [(data['images'].float() / 255, data['targets'])] * 10
    r = fine_tune(bb, batches, data, epochs=2, lr=1e-2, device='cpu', seed=0)
    assert r['steps'] == 20 and 0 <= r['top1'] <= 1
    assert r['top1'] > 0.3    # chance 1/14
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


# ------------------------------------------------------------------------------------------------ records
def test_result_record_round_trip(tmp_path):
    rec = dict(method='mfm', model='vit_small_patch16_224', data='cifar10', protocol='linear', metric='top1', value=0.8123,
               epochs=100, gpu_minutes=12.5, img_per_s=5300.0, details={'top5': 0.99, 'per_seed': [0.8, 0.81]},
               n=np.int64(3), t=torch.tensor(0.25))
    p = write_result(rec, tmp_path / 'results')
    assert p.parent == tmp_path / 'results' and p.suffix == '.json'
    assert [q.name for q in p.parent.iterdir()] == [p.name]            # no temporary file left
    raw = json.loads(p.read_text())
    assert all(f in raw for f in RESULT_FIELDS)
    assert raw['git_commit'] != '' or not (REPO / '.git').exists()
    assert raw['device'] and raw['date'].startswith('20') and raw['command']
    back = read_results(tmp_path / 'results')
    assert len(back) == 1
    r = {k: v for k, v in back[0].items() if k != '_file'}
    for k, v in rec.items():
        if k not in ('n', 't'): assert r[k] == v
    assert r['n'] == 3 and r['t'] == 0.25
    write_result({**rec, 'date': '2000-01-01T00:00:00+00:00'}, tmp_path / 'results')
    assert [x['date'][:4] for x in read_results(tmp_path / 'results')] == ['2000', raw['date'][:4]]   # sorted by date


def test_result_record_validation(tmp_path):
    rec = dict(method='mae', model='vit', data='cifar10', protocol='knn', metric='top1', value=0.5, epochs=None,
               gpu_minutes=None, img_per_s=None)
    for bad, msg in ((dict(value=float('nan')), "'value' must be a finite number"), (dict(epochs=-1), "'epochs' must be"),
                     (dict(method=''), "'method' must be a non-empty string"), (dict(extra=float('inf')), "'extra' is inf"),
                     (dict(extra=object()), "'extra' has type object")):
        with pytest.raises((ValueError, TypeError), match=msg):
            write_result({**rec, **bad}, tmp_path)
    with pytest.raises(ValueError, match=r"lacks the required field\(s\) \['metric'\]"):
        write_result({k: v for k, v in rec.items() if k != 'metric'}, tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / 'broken.json').write_text('{not json')
    (tmp_path / 'partial.json').write_text(json.dumps({'method': 'x'}))
    write_result(rec, tmp_path)
    with pytest.warns(UserWarning, match='not a valid result record'):
        assert len(read_results(tmp_path)) == 1
    assert read_results(tmp_path / 'nothing-here') == []


# ------------------------------------------------------------------------------------------------ checkpoints and CLI
class TinyEvalMethod(Method):
    "A stand-in method (a tiny ViT pulled towards small features), used whatever method modules exist."
    name, recipe = 'tiny_eval_test', 'mae'

    def __init__(self, model='vit_tiny_patch16_224', img_size=32, patch_size=8):
        super().__init__(model=model, img_size=img_size, patch_size=patch_size)
        self.backbone = create_backbone(model, img_size, patch_size, **TINY)

    def forward(self, batch):
        return dict(loss=self.backbone(normalize_images(batch['views'][0])).pow(2).mean())


@pytest.fixture
def tiny_registered(monkeypatch):
    monkeypatch.setitem(METHODS, 'tiny_eval_test', (__name__, 'TinyEvalMethod'))
    monkeypatch.setitem(sys.modules, __name__, sys.modules[__name__])


def train_checkpoint(method, out, steps_epochs=1):
    from folk_nb.trainer import Trainer, TrainConfig
    from folk_nb.data import create_loader
    loader = create_loader('samples', recipe=method.recipe, size=32, batch_size=7, device='cpu', epoch_size=14)
    Trainer(method, loader, TrainConfig(epochs=steps_epochs, progress=False, out_dir=str(out), lr=1e-3)).fit()
    return out / 'checkpoints' / 'last.pt'


def test_load_method_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / 'junk.pt').write_bytes(b'\x00not a checkpoint')
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        load_method(tmp_path / 'junk.pt')
    torch.save({'weights': torch.ones(2)}, tmp_path / 'plain.pt')
    with pytest.raises(ValueError, match='not a folk_nb checkpoint'):
        load_method(tmp_path / 'plain.pt')
    torch.save({'format': 'folk_nb.checkpoint/1', 'step': 3}, tmp_path / 'partial.pt')
    with pytest.raises(ValueError, match=r"lacks \['method', 'method_config', 'model'\]"):
        load_method(tmp_path / 'partial.pt')
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        load_method(tmp_path / 'absent.pt')


def test_load_method_restores_the_trained_weights(tmp_path, tiny_registered):
    torch.manual_seed(0)
    m = create_method('tiny_eval_test')
    ckpt = train_checkpoint(m, tmp_path / 'run')
    back = load_method(ckpt, 'cpu')
    assert type(back).__name__ == 'TinyEvalMethod' and not back.training
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()): assert torch.equal(a, b), k
    assert back.checkpoint_info['step'] == 2 and back.checkpoint_info['epochs_done'] == 1
    x = sample_images(size=32)[:2]
    m.eval()
    assert torch.allclose(m.embed(x), back.embed(x))
    # a checkpoint whose weights do not fit its own config is refused clearly
    state = torch.load(ckpt, weights_only=True)
    state['method_config'] = {**state['method_config'], 'patch_size': 4}
    torch.save(state, tmp_path / 'mismatch.pt')
    with pytest.raises(ValueError, match='does not match method'):
        load_method(tmp_path / 'mismatch.pt')


def test_cli_end_to_end_on_a_trainer_checkpoint(tmp_path, tiny_registered, capsys):
    ckpt = train_checkpoint(create_method('tiny_eval_test'), tmp_path / 'run')
    out = tmp_path / 'results'
    common = ['--checkpoint', str(ckpt), '--data', 'samples', '--out', str(out), '--device', 'cpu', '--epochs', '5',
              '--min-steps', '40']
    assert main(common + ['--protocol', 'knn']) == 0
    assert main(common + ['--protocol', 'linear', '--pool', 'mean']) == 0
    assert main(common + ['--protocol', 'fewshot', '--fractions', '0.5', '--seeds', '0', '1']) == 0
    assert main(common + ['--protocol', 'robustness', '--kinds', 'contrast', '--severities', '1', '5']) == 0
    text = capsys.readouterr().out
    n = len(dataset_tensors('samples', size=32)['images'])    # fewer than --k 200
    assert f'kNN (k={n}, T=0.1) top-1: 1.0000' in text and 'linear probe top-1' in text and 'clean top-1' in text
    assert f'using k={n}' in text
    recs = {r['protocol']: r for r in read_results(out)}
    assert sorted(recs) == ['fewshot', 'knn', 'linear', 'robustness'] and len(list(out.iterdir())) == 4
    for r in recs.values():
        assert all(f in r for f in RESULT_FIELDS)
        assert r['method'] == 'tiny_eval_test' and r['model'] == 'vit_tiny_patch16_224' and r['data'] == 'samples'
        assert r['epochs'] == 1 and r['steps'] == 2 and r['img_per_s'] > 0
        assert r['gpu_minutes'] is None                       # trained on the CPU
        assert r['command'].startswith('folk_nb_eval --checkpoint')
        assert 0 <= r['value'] <= 1
    assert recs['knn']['value'] == 1.0                        # samples: train = test, one picture per class
    assert all(r['test_is_train'] is True for r in recs.values()) and recs['knn']['k'] == recs['knn']['n_train'] == n
    assert recs['linear']['pool'] == 'mean' and recs['knn']['pool'] == 'default'
    assert recs['fewshot']['label_fraction'] == 0.5 and len(recs['fewshot']['per_seed']) == 2
    assert set(recs['robustness']['top1']['contrast']) == {'1', '5'}
    n = len(list(out.iterdir()))
    assert main(common + ['--protocol', 'knn', '--no-write']) == 0 and len(list(out.iterdir())) == n


def test_cli_random_init_baseline(tmp_path, tiny_registered):
    out = tmp_path / 'results'
    args = ['--random-init', 'tiny_eval_test', '--method-config', '{"patch_size": 4}', '--data', 'samples',
            '--out', str(out), '--device', 'cpu', '--protocol', 'knn', '--seeds', '3']
    assert main(args) == 0
    (r,) = read_results(out)
    assert r['epochs'] == 0 and r['steps'] == 0 and r['random_init'] is True and r['checkpoint'] is None
    assert r['method_config']['patch_size'] == 4 and r['gpu_minutes'] is None and r['img_per_s'] is None
    # seeded: the same weights give the same record value; the global RNG is left alone
    state = torch.get_rng_state()
    assert main(args) == 0 and torch.equal(state, torch.get_rng_state())
    assert len({r['value'] for r in read_results(out)}) == 1
    with pytest.raises(SystemExit):   # one source only
        main(['--random-init', 'tiny_eval_test', '--checkpoint', 'x.pt', '--data', 'samples'])


def test_evaluate_returns_exactly_the_records_it_wrote(tmp_path, tiny_registered, capsys):
    ckpt = train_checkpoint(create_method('tiny_eval_test'), tmp_path / 'run')
    out = tmp_path / 'results'
    common = ['--checkpoint', str(ckpt), '--data', 'samples', '--out', str(out), '--device', 'cpu', '--epochs', '5',
              '--min-steps', '40']
    knn = evaluate(common + ['--protocol', 'knn'])
    few = evaluate(common + ['--protocol', 'fewshot', '--fractions', '0.5', '1.0', '--seeds', '0'])
    assert [(r['protocol'], r['metric']) for r in knn] == [('knn', 'top1')]
    assert [(r['protocol'], r['metric'], r['label_fraction']) for r in few] == [('fewshot', 'top1', 0.5), ('fewshot', 'top1', 1.0)]
    on_disk = {r['_file']: r for r in read_results(out)}
    assert len(on_disk) == 3 and len(list(out.iterdir())) == 3
    for r in knn + few:
        assert on_disk[r['_file']] == r                       # the very record of that file, every field
        assert {**json.loads((out / r['_file']).read_text()), '_file': r['_file']} == r
    assert all(f in r for r in knn + few for f in RESULT_FIELDS)
    text = capsys.readouterr().out
    assert all(f"wrote {out / r['_file']}" in text for r in knn + few)
    # --no-write: the same kind of record, complete, but no file
    (dry,) = evaluate(common + ['--protocol', 'knn', '--no-write'])
    assert dry['_file'] is None and dry['value'] == knn[0]['value'] and all(f in dry for f in RESULT_FIELDS)
    assert len(list(out.iterdir())) == 3 and 'wrote' not in capsys.readouterr().out


def test_main_is_evaluate_with_an_exit_status(tmp_path, tiny_registered, capsys):
    ckpt = train_checkpoint(create_method('tiny_eval_test'), tmp_path / 'run')
    out = tmp_path / 'results'
    assert main(['--checkpoint', str(ckpt), '--data', 'samples', '--out', str(out), '--device', 'cpu']) == 0
    (r,) = read_results(out)
    assert r['protocol'] == 'knn' and r['command'].startswith('folk_nb_eval --checkpoint')
    # a bad argument: argparse's usage error and exit status 2, as before
    with pytest.raises(SystemExit) as e:
        main(['--checkpoint', str(ckpt), '--protocol', 'nope'])
    assert e.value.code == 2
    assert "argument --protocol: invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(['--data', 'samples'])                           # no source
    assert e.value.code == 2 and 'one of the arguments --checkpoint --random-init is required' in capsys.readouterr().err
    # errors of the evaluation itself: one line on stderr, exit status 2
    for argv, text in ((['--checkpoint', str(tmp_path / 'absent.pt')], 'checkpoint not found'),
                       (['--random-init', 'tiny_eval_test', '--method-config', '[1]'], '--method-config must be a JSON object')):
        with pytest.raises(SystemExit) as e:
            main(argv + ['--data', 'samples', '--out', str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('folk_nb_eval: error: ') and text in err and err.count('\n') == 1
    assert len(read_results(out)) == 1


def real_method_configs():
    "Tiny configs of the real methods whose modules import (skipped otherwise)."
    vit = dict(model='vit_tiny_patch16_224', img_size=32, patch_size=8, model_kwargs=dict(TINY))
    return [('mae', dict(vit, decoder_dim=32, decoder_depth=1, decoder_heads=2)), ('mfm', vit)]


@pytest.mark.parametrize('name,config', real_method_configs())
def test_cli_on_a_real_method(tmp_path, name, config):
    try: m = create_method(name, **config)
    except (ImportError, AttributeError) as e: pytest.skip(f"method {name!r} not available yet ({e})")
    ckpt = train_checkpoint(m, tmp_path / 'run')
    assert main(['--checkpoint', str(ckpt), '--data', 'samples', '--out', str(tmp_path / 'res'), '--device', 'cpu',
                 '--protocol', 'knn']) == 0
    (r,) = read_results(tmp_path / 'res')
    assert r['method'] == name and r['method_config'] == json.loads(json.dumps(m.config)) and r['value'] == 1.0


# ------------------------------------------------------------------------------------------------ benchmark helpers
def load_bench():
    spec = importlib.util.spec_from_file_location('bench_train_step', REPO / 'bench' / 'train_step.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_flop_count_matches_the_formula():
    bench = load_bench()
    lin = nn.Linear(64, 32)
    x = torch.randn(16, 64, requires_grad=True)
    # forward 2*B*in*out, backward: grad of input and of weight, 2*B*in*out each
    assert bench.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 16 * 64 * 32
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    xc = torch.randn(2, 3, 10, 10)                         # input needs no grad: forward + weight grad only
    assert bench.count_flops(lambda: conv(xc).sum().backward()) == 2 * (2 * 2 * 10 * 10 * 8 * 3 * 9)


def test_bench_runs_one_tiny_config():
    bench = load_bench()
    try: create_method('mfm', model='vit_tiny_patch16_224', img_size=32, patch_size=4)
    except (ImportError, AttributeError) as e: pytest.skip(f"method 'mfm' not available yet ({e})")
    row = bench.bench_one('mfm', 'vit_micro_p4_32', batch=4, steps=1, warmup=1, device=torch.device('cpu'),
                          amp='auto', compile=False, peak_flops=1e12)
    assert row['status'] == 'ok', row
    assert row['flops_per_img'] > 0 and row['img_per_s'] > 0 and row['plain_img_per_s'] > 0
    assert row['mfu'] == pytest.approx(row['flops_per_img'] * row['img_per_s'] / 1e12)


def test_bench_counts_graphs_compiled_without_cuda_graphs():
    """The bench reads inductor's own count of graphs that skipped CUDA graphs (on the CPU every graph does, so a
    'reduce-overhead' compile here counts one) and writes it, with a note, into the row."""
    bench = load_bench()
    before = bench.cuda_graph_skips()
    f = torch.compile(lambda x: (2 * x).sin(), mode='reduce-overhead')
    assert torch.allclose(f(torch.ones(3)), torch.ones(3).mul(2).sin())
    skipped = bench.cuda_graph_skips() - before
    assert skipped == 1
    row = {'notes': ['earlier note']}
    bench.note_cuda_graph_skips(row, skipped)
    assert row['cuda_graph_skips'] == 1 and len(row['notes']) == 2 and 'skipping cudagraphs' in row['notes'][1]
    clean = {}
    bench.note_cuda_graph_skips(clean, 0)
    assert clean == {'cuda_graph_skips': 0}


def load_bench_script(name):
    spec = importlib.util.spec_from_file_location(f'bench_{name}', REPO / 'bench' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_step_categories():
    prof = load_bench_script('profile_step')
    for name, cat in (('aten::addmm', 'matmul'), ('aten::convolution_backward', 'matmul'), ('aten::_fft_r2c', 'fft'),
                      ('aten::native_layer_norm_backward', 'norm'), ('aten::_softmax', 'attention'),
                      ('aten::_scaled_dot_product_flash_attention', 'attention'), ('aten::gelu_backward', 'elementwise'),
                      ('aten::_log_softmax', 'reduction'), ('aten::_to_copy', 'copy'), ('aten::_fused_adamw_', 'optimizer'),
                      ('aten::_foreach_lerp_', 'optimizer'), ('aten::frobnicate', 'other')):
        assert prof.leaf_category(name) == cat, name
    assert prof.kernel_category('triton_poi_fused_add_mul_0') == 'elementwise'
    assert prof.kernel_category('sm90_xmma_gemm_bf16bf16_bf16f32') == 'matmul'


def test_profile_step_reads_cuda_events():
    "The CUDA branch on a hand-made timeline: kernels by launching op, ranges by time (backward on another thread)."
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent
    prof = load_bench_script('profile_step')
    n = iter(range(1, 100))
    def host(name, start, end, thread=1, kernels=()):
        e = FunctionEvent(id=next(n), name=name, thread=thread, start_us=start, end_us=end, use_device='cuda')
        for k, us in kernels: e.append_kernel(k, 0, us)
        return e
    def gpu(name, start, end):
        return FunctionEvent(id=next(n), name=name, thread=7, start_us=start, end_us=end, use_device='cuda',
                             device_type=DeviceType.CUDA)
    events = EventList([
        host('bench::step', 0, 1000), host('bench::forward', 10, 400),
        host('aten::linear', 20, 100), host('aten::addmm', 30, 90, kernels=[('sm90_xmma_gemm', 200)]),
        host('cudaLaunchKernel', 40, 50), host('bench::mask', 150, 250),
        host('aten::_local_scalar_dense', 160, 200, kernels=[('Memcpy DtoH (Device -> Pinned)', 2)]),
        host('cudaStreamSynchronize', 170, 195), host('bench::backward', 400, 800),
        host('aten::mm', 450, 500, thread=2, kernels=[('sm90_xmma_gemm', 300)]),          # the autograd thread
        host('Optimizer.step#AdamW.step', 800, 950),
        host('aten::_fused_adamw_', 810, 900, kernels=[('fused_adam_kernel', 100)]),
        host('cudaDeviceSynchronize', 1100, 1200),                                       # the bench's own, outside
        gpu('sm90_xmma_gemm', 100, 300), gpu('Memcpy DtoH (Device -> Pinned)', 300, 302),
        gpu('sm90_xmma_gemm', 500, 800), gpu('fused_adam_kernel', 900, 1000), gpu('bench::step', 0, 1000)],
        use_device='cuda')
    events._build_tree()
    row = prof.analyse(events, cuda=True, n_steps=1, step_ms=1.0)
    ms = row['categories_ms']
    assert ms['matmul'] == pytest.approx(0.5) and ms['copy'] == pytest.approx(0.002) and ms['optimizer'] == pytest.approx(0.1)
    assert sum(row['category_shares'].values()) == pytest.approx(1.0)
    reg = row['regions']
    assert reg['forward']['device_ms'] == pytest.approx(0.202) and reg['backward']['device_ms'] == pytest.approx(0.3)
    assert reg['mask']['device_ms'] == pytest.approx(0.002) and reg['mask']['host_share'] == pytest.approx(0.1)
    assert row['mask_share'] == pytest.approx(0.002 / 0.602)
    assert row['host_syncs'] == 1 and row['sync_sources'] == {'mask': 1} and row['syncs']['DtoH copies'] == 1
    assert row['kernels'] == 3 and row['gpu_busy_ms'] == pytest.approx(0.602)
    assert row['gpu_idle_share'] == pytest.approx(0.398)


@pytest.mark.parametrize('method,model', [('mfm', 'vit_micro_p4_32'), ('saliency_moco', 'resnet18_32')])
def test_profile_step_smoke(tmp_path, method, model):
    "One profiled step of a tiny configuration: a JSON row with every category, shares summing to 1, the ranges gone after."
    from folk_nb.mfm import MFM
    prof = load_bench_script('profile_step')
    before = (MFM.mask, torch.Tensor.backward, nn.utils.clip_grad_norm_)
    out = tmp_path / 'profile.jsonl'
    assert prof.main(['--device', 'cpu', '--methods', method, '--models', model, '--batch', '2', '--steps', '1',
                      '--warmup', '0', '--out', str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row['status'] == 'ok', row
    assert row['bench'] == 'profile_step' and row['command'].startswith('python bench/profile_step.py')
    assert set(row['category_shares']) == set(prof.CATEGORIES)
    assert sum(row['category_shares'].values()) == pytest.approx(1.0)
    assert row['host_syncs'] >= 0 and row['aten_ops'] > 0 and row['step_ms'] > 0
    assert 0 < row['mask_share'] < 1
    assert {'forward', 'backward', 'optimizer_step'} <= set(row['regions'])
    if method == 'saliency_moco':
        assert row['regions']['hard_negative_key_pass']['calls'] == 1 and row['regions']['key_encoder']['calls'] == 1
        assert 0 < row['hard_negative_pass_share'] < 1 and row['saliency_mask_share'] == row['mask_share']
    assert (MFM.mask, torch.Tensor.backward, nn.utils.clip_grad_norm_) == before      # the bench's ranges are removed


def test_run_facts_use_the_cumulative_training_time(tmp_path):
    "gpu_minutes comes from summary.json's train_seconds (all parts of a resumed run) times the processes; CPU runs: none."
    from folk_nb.eval import _run_facts
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'summary.json').write_text(json.dumps(dict(seconds=30.0, train_seconds=150.0, img_per_s=1000.0)))
    (tmp_path / 'config.json').write_text(json.dumps(dict(device='cuda:0', gpu='NVIDIA H100 80GB HBM3', world_size=2)))
    facts = _run_facts(tmp_path / 'checkpoints' / 'last.pt')
    assert facts == dict(img_per_s=1000.0, gpu_minutes=150.0 * 2 / 60, train_device='NVIDIA H100 80GB HBM3')
    (tmp_path / 'config.json').write_text(json.dumps(dict(device='cpu', world_size=1)))
    assert _run_facts(tmp_path / 'checkpoints' / 'last.pt')['gpu_minutes'] is None


def test_epochs_done_counts_loader_passes_also_for_time_budgeted_runs():
    "epochs = step / steps per epoch; a time-budgeted run's schedule length (capped by a huge `epochs`) must not enter it."
    from folk_nb.eval import _epochs_done
    budgeted = dict(step=2274, total_steps=2447, epoch=23, steps_per_epoch=97,
                    train_config=dict(epochs=100000, max_steps=None, time_budget_min=2.0))
    assert _epochs_done(budgeted) == round(2274 / 97, 4)
    old_budgeted = {k: v for k, v in budgeted.items() if k != 'steps_per_epoch'}
    assert _epochs_done(old_budgeted) == 23                       # no loader length saved: whole epochs done
    old_epochs = dict(step=30, total_steps=60, epoch=1, train_config=dict(epochs=4, max_steps=None))
    assert _epochs_done(old_epochs) == 2.0                        # the schedule spanned exactly 4 epochs


# ------------------------------------------------------------------------------------------------ CLI option checks
def _folder(root, names, size=8):
    "An image folder root/<name>/<class>/<image>.png (or root/<class>/... for name '') of random pictures."
    from PIL import Image
    g = np.random.default_rng(0)
    for name in names:
        for c in ('a', 'b'):
            d = root / name / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(3): Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f'{i}.png')
    return root


@pytest.mark.parametrize('layout,same', [(['train', 'test'], False), ([''], True)])
def test_test_split_equal_to_train_is_flagged(tmp_path, tiny_registered, capsys, layout, same):
    data = _folder(tmp_path / 'imgs', layout)
    (r,) = evaluate(['--random-init', 'tiny_eval_test', '--data', str(data), '--device', 'cpu', '--no-write'])
    err = capsys.readouterr().err
    assert r['test_is_train'] is same
    assert ('warning: the test images are the training images' in err) is same
    if same: assert 'has no train/ and test/ subfolders' in err and len(err.strip().splitlines()) == 1


def test_samples_and_equal_split_names_are_flagged(tmp_path, tiny_registered, capsys):
    (r,) = evaluate(['--random-init', 'tiny_eval_test', '--data', 'samples', '--device', 'cpu', '--no-write'])
    assert r['test_is_train'] is True and "'samples' has no test split" in capsys.readouterr().err
    data = _folder(tmp_path / 'imgs', ['train', 'test'])
    (r,) = evaluate(['--random-init', 'tiny_eval_test', '--data', str(data), '--device', 'cpu', '--no-write',
                     '--split-test', 'train'])
    assert r['test_is_train'] is True and "both 'train'" in capsys.readouterr().err


def test_method_config_with_a_checkpoint_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(['--checkpoint', str(tmp_path / 'x.pt'), '--method-config', '{"img_size": 32}', '--data', 'samples'])
    assert e.value.code == 2 and '--method-config only applies with --random-init' in capsys.readouterr().err


@pytest.mark.parametrize('opt', ['--max-train', '--max-test'])
@pytest.mark.parametrize('n', ['0', '-3'])
def test_max_train_and_test_must_be_positive(tiny_registered, capsys, opt, n):
    with pytest.raises(SystemExit) as e:
        main(['--random-init', 'tiny_eval_test', '--data', 'samples', '--device', 'cpu', '--no-write', opt, n])
    assert e.value.code == 2 and f'{opt} must be at least 1 image, got {n}' in capsys.readouterr().err


def test_k_is_capped_at_the_training_set_and_recorded(tiny_registered, capsys):
    args = ['--random-init', 'tiny_eval_test', '--data', 'samples', '--device', 'cpu', '--no-write']
    (big,) = evaluate(args + ['--k', '100000'])
    out = capsys.readouterr().out
    n = len(dataset_tensors('samples', size=32)['images'])
    assert big['k'] == big['n_train'] == n and f'note: --k 100000 is more than the {n} training images; using k={n}' in out
    (small,) = evaluate(args + ['--k', '3'])
    assert small['k'] == 3 and 'note:' not in capsys.readouterr().out


def test_random_init_without_a_model_uses_the_pretraining_default(monkeypatch):
    from folk_nb import eval as ev
    from folk_nb.cli import DEFAULT_MODEL
    assert ev._method_config('mae', {'img_size': 32}) == {'img_size': 32, 'model': DEFAULT_MODEL['mae']}
    assert ev._method_config('mae', {'model': 'resnet18'}) == {'model': 'resnet18'}
    assert ev._method_config('tiny_eval_test', {}) == {}          # unknown to the CLI: the method's own default
    seen = {}
    import folk_nb.methods as methods
    def fake_create(name, **kw):
        seen.update(kw); raise ValueError('stop here')
    monkeypatch.setattr(methods, 'create_method', fake_create)
    with pytest.raises(ValueError, match='stop here'):
        evaluate(['--random-init', 'mae', '--method-config', '{"img_size": 32}', '--data', 'samples', '--device', 'cpu'])
    assert seen == {'img_size': 32, 'model': DEFAULT_MODEL['mae']}


def test_loader_bench_times_eager_and_fused_views(capsys):
    loader_bench = load_bench_script('loader')
    assert loader_bench.main(['--device', 'cpu', '--recipes', 'moco', '--batch', '8', '--batches', '1', '--warmup', '1',
                              '--no-save']) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith('moco'))
    eager, fused = (float(v) for v in re.findall(r'(?:eager|fused)\s+([\d.]+) ms/batch', line))
    assert eager > 0 and fused > 0 and '2 views' in line and 'compilation failed' not in line


def test_folder_loader_bench_compares_colour_in_workers_and_on_the_device(capsys, tmp_path):
    fl = load_bench_script('folder_loader')
    from PIL import Image
    fl.write_photos(tmp_path / 'p', 3)
    files = sorted((tmp_path / 'p' / 'all').glob('*.jpg'))
    assert len(files) == 3 and Image.open(files[0]).size == fl.PHOTO
    assert fl.main(['--device', 'cpu', '--recipes', 'moco', '--size', '32', '--batch', '4', '--images', '8',
                    '--workers', '0', '--no-save']) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith('moco'))
    worker, crop = (float(v) for v in re.findall(r'(?:worker|crop only)\s+([\d.]+) ms', line))
    before, after = (float(v) for v in re.search(r'workers:\s+([\d.]+) ->\s+([\d.]+) img/s', line).groups())
    assert worker > crop > 0 and before > 0 and after > 0


def test_split_bn_bench_baseline_computes_the_same_layer(capsys):
    "bench/split_bn.py's eager baseline (contiguous splits) = SplitBatchNorm2d (interleaved splits) up to the order."
    from folk_nb.moco import SplitBatchNorm2d
    sb = load_bench_script('split_bn')
    torch.manual_seed(0)
    x = torch.randn(12, 5, 3, 4) * 2 + 1
    new, old = SplitBatchNorm2d(5, 3), sb.EagerSplitBatchNorm2d(5, 3)
    with torch.no_grad():
        for l in (new, old): l.weight.copy_(torch.linspace(0.5, 2, 5)); l.bias.copy_(torch.linspace(-1, 1, 5))
    order = torch.arange(12).view(4, 3).t().reshape(-1)     # chunk g of x[order] = the interleaved split x[g::3]
    torch.testing.assert_close(old(x[order]), new(x)[order], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(old.running_mean, new.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(old.running_var, new.running_var, atol=1e-6, rtol=1e-6)
    assert sb.main(['--device', 'cpu', '--batch', '16', '--iters', '1', '--warmup', '1', '--dtypes', 'fp32',
                    '--layouts', 'nchw', '--no-save']) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.split()[:1] and 'x' in l.split()[0] and l.split()[1] == 'nchw']
    assert [r.split()[0] for r in rows] == ['64x32x32', '128x16x16', '256x8x8', '512x4x4']
    assert all(float(v) > 0 for r in rows for v in r.split()[3:6])
    assert 'all layers: split / plain' in out


def test_bench_saliency_map_flop_share():
    "The query's saliency map (momentum encoder, one forward) against a MoCo step counted by hand."
    from torch.utils.flop_counter import FlopCounterMode
    bench = load_bench()
    row = bench.bench_one('saliency_moco', 'resnet18_32', batch=4, steps=1, warmup=1, device=torch.device('cpu'),
                          method_kwargs={'queue_size': 16})
    assert row['status'] == 'ok', row
    torch.manual_seed(0)
    m = create_method('moco', model='resnet18', img_size=32, cifar_stem=True, queue_size=16)
    x = torch.rand(4, 3, 32, 32)
    with FlopCounterMode(display=False) as fwd: m.backbone(x)          # one encoder forward (no head)
    with FlopCounterMode(display=False) as step: m({'views': [x, x]})['loss'].backward()
    assert row['moco_step_flops_per_img'] == pytest.approx(step.get_total_flops() / 4)
    assert row['saliency_map_flops_per_img'] == pytest.approx(fwd.get_total_flops() / 4)
    assert row['saliency_map_flop_share'] == pytest.approx(fwd.get_total_flops() / step.get_total_flops())
    assert 0.2 < row['saliency_map_flop_share'] < 0.3        # one forward of the 4 a MoCo step has (3 train + 1 key)
    warped = bench.bench_one('saliency_moco', 'resnet18_32', batch=4, steps=1, warmup=1, device=torch.device('cpu'),
                             method_kwargs={'queue_size': 16, 'saliency': 'warped_key'})
    assert warped['status'] == 'ok', warped
    assert warped['moco_step_flops_per_img'] == pytest.approx(row['moco_step_flops_per_img'])
    assert warped['saliency_map_flops_per_img'] == 0          # carried over from the key pass: no encoder forward
    for r in (row, warped):                                   # the step against plain MoCo's, timed in the same run
        assert r['paired_rounds'] == 5 and r['paired_step_ms'] > 0 and r['moco_step_ms'] > 0
        lo, hi = r['over_moco_step_range']                    # the median of the pairs' ratios lies within them
        assert 0 < lo <= r['over_moco_step'] <= hi
    assert warped['flops_per_img'] < row['flops_per_img'] - 0.9 * row['saliency_map_flops_per_img']   # and the step lost it


def test_cifar10_table_smoke_with_an_ablation(tmp_path, cifar10_archive, cifar10_root, capsys):
    "bench/cifar10_table.py --smoke end to end: the --method-args override reaches the run, records carry the fields."
    table = load_bench_script('cifar10_table')
    with pytest.raises(SystemExit):
        table.main(['--record-field', 'budget=x'])                         # a field the records set themselves
    assert 'records set that field themselves' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        table.main(['--pretrain-args', '--channels-last "off'])              # an unclosed quote
    assert '--pretrain-args is not a valid argument string' in capsys.readouterr().err
    res = tmp_path / 'res'
    rc = table.main(['--smoke', '--methods', 'moco', '--batch-size', '32', '--device', 'cpu',
                     '--archive', str(cifar10_archive), '--data-root', str(cifar10_root), '--runs', str(tmp_path / 'runs'),
                     '--results', str(res), '--method-args', '{"bn_splits": 4}', '--record-field', 'ablation=split BN',
                     '--pretrain-args', '--channels-last off'])
    assert rc == 0
    config = json.loads((tmp_path / 'runs' / 'moco' / 'config.json').read_text())
    assert config['method_config']['bn_splits'] == 4 and config['method_config']['queue_size'] == 4096   # merged
    records = [json.loads(p.read_text()) for p in sorted(res.glob('*.json'))]
    assert sorted(r['protocol'] for r in records) == ['knn', 'linear']
    for r in records:
        assert r['method_args_override'] == {'bn_splits': 4} and r['ablation'] == 'split BN'
        assert r['budget'].startswith('0.05 training minutes') and r['pretrain_args_extra'] == '--channels-last off'
    args = json.loads((tmp_path / 'runs' / 'moco' / 'args.json').read_text())
    assert args['channels_last'] == 'off'                                  # the extra argument reached the run


def test_bench_times_famt_in_its_steady_state():
    "At --at 0.5 the timed FAMT steps are outside a refresh window: the bank of the other images is marked current."
    bench = load_bench()
    row = bench.bench_one('famt', 'vit_micro_p4_32', batch=4, steps=1, warmup=1, device=torch.device('cpu'), at=0.5)
    assert row['status'] == 'ok', row
    assert any('steady state' in n for n in row['notes'])
    method, _ = bench.build_method('famt', 'vit_micro_p4_32', 4, torch.device('cpu'), None, 0.5)
    b = bench.first_batch(method, 'vit_micro_p4_32', 4, torch.device('cpu'), 0.5)
    assert method.pending                                   # without famt_bank: still in the refresh window
    bench.famt_bank(method, False, [])
    assert not method.pending


def test_gpu_session_scripts_parse_and_pack_their_output():
    "The next GPU session's call scripts (bench/gpu_session): valid bash, each sources common.sh and packs into $OUT."
    import subprocess
    scripts = sorted((REPO / 'bench' / 'gpu_session').glob('call*.sh'))
    assert len(scripts) >= 3
    for f in [REPO / 'bench' / 'gpu_session' / 'common.sh', *scripts]:
        r = subprocess.run(['bash', '-n', str(f)], capture_output=True, text=True)
        assert r.returncode == 0, (f.name, r.stderr)
    for f in scripts:
        text = f.read_text()
        assert 'source "$(dirname "$0")/common.sh"' in text and '\npack ' in text, f.name


def _photo_folder(root, n=10, size=(40, 30)):
    "root/<train|test>/<class>/<i>.jpg from the sample pictures, of varied sizes."
    from PIL import Image
    from folk_nb.images import to_uint8_image
    pics = sample_images(size=48)
    for split in ('train', 'test'):
        for i in range(n):
            d = root / split / f'c{i % 2}'
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8_image(pics[i % len(pics)])).resize((size[0] + i, size[1])).save(d / f'{i}.jpg')
    return root


@pytest.mark.parametrize('num_workers', [0, 2])
def test_streamed_folder_features_equal_the_in_memory_ones(tmp_path, num_workers):
    "FolderBatches decodes as dataset_tensors does: same images, same order, whatever the number of workers."
    from folk_nb.eval import FolderBatches
    root = _photo_folder(tmp_path / 'photos')
    mem = dataset_tensors(root, 'train', size=24, cache=False)
    batches = list(FolderBatches(root / 'train', 24, batch_size=3, num_workers=num_workers))
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1] and all(x.dtype == torch.uint8 for x, _ in batches)
    assert torch.equal(torch.cat([x for x, _ in batches]), mem['images'])
    assert torch.equal(torch.cat([y for _, y in batches]), mem['targets'])


def test_the_trainer_knn_monitor_reads_a_streamed_folder(tmp_path):
    "The kNN monitor takes FolderBatches like in-memory data, with the same accuracy."
    from folk_nb.eval import FolderBatches
    from folk_nb.data import create_loader
    from folk_nb.trainer import Trainer, TrainConfig
    root = _photo_folder(tmp_path / 'photos')
    acc = {}
    for kind in ('memory', 'stream'):
        torch.manual_seed(0)
        m = create_method('mae', model='vit_tiny_patch16_224', img_size=32, patch_size=8, model_kwargs={'depth': 1})
        knn = tuple(dataset_tensors(root, s, size=32, cache=False) if kind == 'memory' else
                    FolderBatches(root / s, 32, batch_size=4, num_workers=0) for s in ('train', 'test'))
        loader = create_loader('samples', recipe='mae', size=32, batch_size=7, device='cpu', epoch_size=14)
        t = Trainer(m, loader, TrainConfig(epochs=1, lr=1e-3, knn_every=1, progress=False, out_dir=str(tmp_path / kind)),
                    knn_data=knn)
        acc[kind] = t.fit()['knn_top1']
    assert acc['memory'] == acc['stream'] and 0 <= acc['stream'] <= 1


def test_feature_extraction_shows_progress_on_long_data(capsys):
    "A bar over the batches from PROGRESS_FROM batches on (or when asked), none for small data."
    from folk_nb.eval import PROGRESS_FROM
    imgs = (sample_images(size=16)[:4] * 255).round().to(torch.uint8)
    fn = lambda x: x.mean((2, 3))
    extract_features(fn, {'images': imgs, 'targets': torch.arange(4)}, 'cpu', batch_size=2)
    assert 'features' not in capsys.readouterr().err
    many = {'images': imgs.repeat(PROGRESS_FROM // 2, 1, 1, 1), 'targets': torch.zeros(4 * (PROGRESS_FROM // 2), dtype=torch.long)}
    f, _ = extract_features(fn, many, 'cpu', batch_size=2)
    err = capsys.readouterr().err
    assert len(f) == 2 * PROGRESS_FROM and 'features' in err and f'0/{PROGRESS_FROM}' in err   # its total: the batches
    extract_features(fn, many, 'cpu', batch_size=2, progress=False)
    assert 'features' not in capsys.readouterr().err


@pytest.mark.parametrize('stream', ['off', 'on'])
def test_folk_nb_eval_reads_an_imagenet_style_val_split(tmp_path, stream):
    "root/train and root/val (ImageNet's layout): --split-test val evaluates on val/, held in memory or streamed."
    from folk_nb.eval import evaluate
    root = _photo_folder(tmp_path / 'photos', n=6)
    (root / 'test').rename(root / 'val')
    (r,) = evaluate(['--random-init', 'mae', '--method-config', '{"img_size": 32, "patch_size": 8, "model_kwargs": '
                     '{"depth": 1}}', '--data', str(root), '--split-test', 'val', '--protocol', 'knn', '--device', 'cpu',
                     '--no-write', '--stream', stream, '--num-workers', '0'])
    assert (r['n_train'], r['n_test'], r['test_is_train'], r['split_test']) == (6, 6, False, 'val')
