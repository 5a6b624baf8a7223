"""Tests of folk_nb.data: datasets, CIFAR-10, augmentations, the device-resident loader.

References are independent of the library: files decoded one by one with PIL / numpy, crops taken by slicing,
torchvision's own per-image functional ops and RandomResizedCrop.get_params.
"""
import math
import os
import socket
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

import reference
from aten_ops import AtenOps
from folk_nb import data as D
from folk_nb.checks import host_syncs
from folk_nb.data import (CIFAR10_CLASSES, DATASET_STATS, CorruptImageWarning, GPUDataLoader, ImageFolderDataset,
                          RandomResizedCropFlip, ViewSpec, augment_batch, channel_stats, color_jitter, create_dataset,
                          create_loader, dataset_tensors, gaussian_blur, load_folder_tensors, make_transform,
                          prepare_cifar10, resized_crop, sample_crop_boxes, view_specs,
                          map_between_views)


def pil_array(path):
    "Reference decode of one file: PIL -> RGB -> HxWx3 uint8."
    with Image.open(path) as im: return np.array(im.convert('RGB'))


def write_folder(root, classes=('a', 'b', 'c'), n=4, size=(16, 12), fmt='png', seed=0):
    "root/<class>/<i>.<fmt> random images; returns the list of paths written."
    rng = np.random.default_rng(seed)
    paths = []
    for c in classes:
        (Path(root) / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = Path(root) / c / f'{i:02d}.{fmt}'
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
            paths.append(p)
    return paths


def corrupt_warnings(record, path):
    return [w for w in record if issubclass(w.category, CorruptImageWarning) and str(path) in str(w.message)]


# ---------------------------------------------------------------- CIFAR-10 from the archive

def test_cifar10_class_counts(cifar10_root):
    for split, per_class in (('train', 5000), ('test', 1000)):
        ds = create_dataset('cifar10', split, root=cifar10_root)
        assert isinstance(ds, ImageFolderDataset)
        assert tuple(ds.classes) == CIFAR10_CLASSES
        counts = Counter(ds.targets)
        assert len(counts) == 10 and set(counts.values()) == {per_class}
        assert len(ds) == 10 * per_class
    x, y = ds[1234]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert ds.classes[y] == Path(ds.samples[1234][0]).parent.name


def test_prepare_cifar10_idempotent(cifar10_root, cifar10_archive):
    tree = cifar10_root / 'cifar10'
    stamp = (tree / 'test' / 'cat' / '0000.jpg').stat().st_mtime_ns
    assert prepare_cifar10(cifar10_root) == tree                          # found, no archive needed
    assert prepare_cifar10(cifar10_root, archive=cifar10_archive) == tree  # not extracted again
    assert (tree / 'test' / 'cat' / '0000.jpg').stat().st_mtime_ns == stamp


def _tiny_cifar_archive(path, n=2):
    "A tar.gz with the CIFAR-10 archive's layout: n images per class and split, pixel value = class index."
    src = path.parent / 'src'
    for s in ('train', 'test'):
        for k, c in enumerate(CIFAR10_CLASSES):
            (src / 'cifar10' / s / c).mkdir(parents=True)
            for i in range(n): Image.new('RGB', (32, 32), (k * 20, i, 0)).save(src / 'cifar10' / s / c / f'{i:04d}.png')
    with tarfile.open(path, 'w:gz') as tf: tf.add(src / 'cifar10', arcname='cifar10')


def test_prepare_cifar10_extracts_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.delenv('FOLK_NB_CIFAR10_ARCHIVE', raising=False)
    _tiny_cifar_archive(tmp_path / 'tiny.tar.gz')
    root = tmp_path / 'data'
    tree = prepare_cifar10(root, archive=tmp_path / 'tiny.tar.gz')
    assert tree == root / 'cifar10' and sorted(p.name for p in root.iterdir()) == ['cifar10']  # no temporary folder
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob('*.png'))
    assert len(files) == 40 and files[0] == 'test/airplane/0000.png'
    (tmp_path / 'tiny.tar.gz').unlink()
    assert prepare_cifar10(root) == tree  # the second call needs no archive
    ds = create_dataset('cifar10', 'train', root=root)
    assert [ds[i][1] for i in range(len(ds))] == [k for k in range(10) for _ in range(2)]
    assert all(round(float(ds[i][0][0, 0, 0]) * 255) == 20 * ds[i][1] for i in range(len(ds)))
    # the archive is also found as root/cifar10-jpg.tar.gz
    _tiny_cifar_archive(tmp_path / 'other' / 'cifar10-jpg.tar.gz', n=1)
    assert len(create_dataset('cifar10', 'test', root=tmp_path / 'other')) == 10


def test_cifar10_tensors_match_files(cifar10_root):
    t = dataset_tensors('cifar10', 'test', root=cifar10_root)
    assert t['images'].shape == (10000, 3, 32, 32) and t['images'].dtype == torch.uint8
    assert tuple(t['classes']) == CIFAR10_CLASSES and t['corrupt'] == []
    tree = cifar10_root / 'cifar10' / 'test'
    assert (cifar10_root / 'cifar10' / 'test.native.uint8.pt').is_file()  # the cache beside the folder
    rng = np.random.default_rng(0)
    for i in rng.choice(10000, 40, replace=False).tolist():
        f = tree / t['files'][i]
        assert f.parent.name == CIFAR10_CLASSES[int(t['targets'][i])]
        np.testing.assert_array_equal(t['images'][i].permute(1, 2, 0).numpy(), pil_array(f))
    again = dataset_tensors('cifar10', 'test', root=cifar10_root)  # from the cache
    assert torch.equal(again['images'], t['images']) and torch.equal(again['targets'], t['targets'])
    # channel statistics agree with the published training-set values (JPEG test split: within ~0.005)
    mean, std = channel_stats(t['images'])
    np.testing.assert_allclose(mean, DATASET_STATS['cifar10'][0], atol=0.01)
    np.testing.assert_allclose(std, DATASET_STATS['cifar10'][1], atol=0.01)


def test_cifar10_gpu_loader_epoch(cifar10_root):
    dl = GPUDataLoader.from_dataset('cifar10', 'test', root=cifar10_root, views='mae', batch_size=1000, device='cpu')
    assert len(dl) == 10
    seen = []
    for b in dl:
        assert [v.shape for v in b['views']] == [(1000, 3, 32, 32)]
        seen.append(b['index'])
    assert sorted(torch.cat(seen).tolist()) == list(range(10000))


def test_cifar10_missing_gives_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv('FOLK_NB_CIFAR10_ARCHIVE', raising=False)
    with pytest.raises(FileNotFoundError, match='download=True') as e:
        create_dataset('cifar10', root=tmp_path)
    assert str(tmp_path) in str(e.value) and 'archive' in str(e.value)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        prepare_cifar10(tmp_path, archive=tmp_path / 'nope.tar.gz')

    def no_network(*args, **kwargs): raise OSError('network is unreachable (blocked by the test)')
    monkeypatch.setattr(socket, 'getaddrinfo', no_network)
    monkeypatch.setattr(socket, 'create_connection', no_network)
    monkeypatch.setattr(socket.socket, 'connect', no_network)
    with pytest.raises(RuntimeError, match='could not download CIFAR-10') as e:
        create_dataset('cifar10', root=tmp_path, download=True)
    assert 'prepare_cifar10' in str(e.value)


def test_prepare_cifar10_rejects_wrong_archive(tmp_path):
    (tmp_path / 'x').mkdir()
    (tmp_path / 'x' / 'a.txt').write_text('hi')
    with tarfile.open(tmp_path / 'wrong.tar.gz', 'w:gz') as tf: tf.add(tmp_path / 'x', arcname='x')
    with pytest.raises(ValueError, match='does not hold cifar10'):
        prepare_cifar10(tmp_path / 'data', archive=tmp_path / 'wrong.tar.gz')
    assert list((tmp_path / 'data').iterdir()) == []  # atomic: nothing half-extracted left
    (tmp_path / 'bad.tar.gz').write_bytes(b'not a tar')
    with pytest.raises(ValueError, match='not a readable tar'):
        prepare_cifar10(tmp_path / 'data2', archive=tmp_path / 'bad.tar.gz')
    (tmp_path / 'data3' / 'cifar10').mkdir(parents=True)
    with pytest.raises(ValueError, match='not a complete CIFAR-10 tree'):
        prepare_cifar10(tmp_path / 'data3')


# ---------------------------------------------------------------- image folders

def test_corrupt_images_skipped_with_one_warning(tmp_path):
    paths = write_folder(tmp_path / 'f', fmt='jpg')
    garbage, truncated = paths[1], paths[6]
    garbage.write_bytes(b'this is not a jpeg at all')
    truncated.write_bytes(truncated.read_bytes()[:200])
    ds = ImageFolderDataset(tmp_path / 'f')
    assert len(ds) == 12 and ds.n_corrupt == 0
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        epochs = [[ds[i] for i in range(len(ds))] for _ in range(2)]
    assert len(corrupt_warnings(rec, garbage)) == 1 and len(corrupt_warnings(rec, truncated)) == 1
    assert len([w for w in rec if issubclass(w.category, CorruptImageWarning)]) == 2
    assert ds.n_corrupt == 2 and sorted(ds.corrupt_files) == sorted(map(str, (garbage, truncated)))
    # every item is a readable image; a bad one is replaced by the next readable one, the same each epoch
    by_index = {i: ds.samples[i][0] for i in range(12)}
    for i, (x, y) in enumerate(epochs[0]):
        src = by_index[(i + 1) % 12] if by_index[i] in map(str, (garbage, truncated)) else by_index[i]
        np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), pil_array(src) / 255.0, atol=1e-6)
        assert y == ds.class_to_idx[Path(src).parent.name]
        assert torch.equal(x, epochs[1][i][0])


def test_verify_counts_non_images_before_training(tmp_path):
    paths = write_folder(tmp_path / 'f', n=3)
    paths[4].write_bytes(b'\x89PNG garbage')
    with pytest.warns(CorruptImageWarning, match=paths[4].name):
        ds = ImageFolderDataset(tmp_path / 'f', verify=True)
    assert ds.n_corrupt == 1 and ds.corrupt_files == [str(paths[4])]


def test_corrupt_count_seen_from_worker_processes(tmp_path):
    paths = write_folder(tmp_path / 'f', n=4)
    paths[2].write_bytes(b'garbage')
    ds = ImageFolderDataset(tmp_path / 'f')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        n = sum(len(x) for x, _ in torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2))
    assert n == 12 and ds.n_corrupt == 1 and ds.corrupt_files == [str(paths[2])]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist') as e:
        ImageFolderDataset(tmp_path / 'missing')
    assert str(tmp_path / 'missing') in str(e.value)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no class folders') as e:
        ImageFolderDataset(tmp_path / 'empty')
    assert str(tmp_path / 'empty') in str(e.value)
    (tmp_path / 'noimg' / 'cat').mkdir(parents=True)
    (tmp_path / 'noimg' / 'cat' / 'notes.txt').write_text('no images here')
    with pytest.raises(ValueError, match='no image files') as e:
        ImageFolderDataset(tmp_path / 'noimg')
    assert str(tmp_path / 'noimg') in str(e.value)
    (tmp_path / 'file.jpg').write_bytes(b'x')
    with pytest.raises(ValueError, match='is a file'):
        ImageFolderDataset(tmp_path / 'file.jpg')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        create_dataset(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match="'samples', 'cifar10'"):
        create_dataset('imagenet-21k')
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        create_dataset('samples', split='val')


def test_folder_split_subfolder(tmp_path):
    write_folder(tmp_path / 'train', classes=('x', 'y'), n=2)
    write_folder(tmp_path / 'test', classes=('x', 'y'), n=1)
    assert len(create_dataset(tmp_path, 'train')) == 4 and len(create_dataset(tmp_path, 'test')) == 2


def test_a_folder_split_is_any_subfolder(tmp_path):
    "ImageNet's layout: train/ and val/. Any subfolder is a split; a missing one is named, not replaced by the root."
    write_folder(tmp_path / 'train', classes=('x', 'y'), n=2)
    write_folder(tmp_path / 'val', classes=('x', 'y'), n=3, size=(8, 8))
    assert len(create_dataset(tmp_path, 'val')) == 6
    assert dataset_tensors(tmp_path, 'val', size=8, cache=False)['images'].shape == (6, 3, 8, 8)
    for fn in (lambda: create_dataset(tmp_path, 'valid'), lambda: dataset_tensors(tmp_path, 'valid', size=8)):
        with pytest.raises(FileNotFoundError, match="split 'valid': there is no folder"):
            fn()
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        dataset_tensors('cifar10', 'val')
    with pytest.raises(ValueError, match='split must be a non-empty string'):
        create_dataset(tmp_path, '')
    assert len(create_dataset(tmp_path / 'train')) == 4  # a folder of classes: split ignored


def test_load_folder_tensors_and_cache(tmp_path):
    paths = write_folder(tmp_path / 'train', n=3)
    t = load_folder_tensors(tmp_path / 'train')
    assert t['images'].shape == (9, 3, 12, 16) and t['targets'].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, p in enumerate(sorted(paths)):
        np.testing.assert_array_equal(t['images'][i].permute(1, 2, 0).numpy(), pil_array(p))
    cache = tmp_path / 'train.native.uint8.pt'
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    assert torch.equal(load_folder_tensors(tmp_path / 'train')['images'], t['images']) and cache.stat().st_mtime_ns == stamp
    # a changed file list rebuilds the cache; a corrupt file is skipped with a warning
    Image.new('RGB', (16, 12), (1, 2, 3)).save(tmp_path / 'train' / 'b' / '09.png')
    (tmp_path / 'train' / 'c' / 'zz.png').write_bytes(b'garbage')
    with pytest.warns(CorruptImageWarning, match='zz.png'):
        t2 = load_folder_tensors(tmp_path / 'train')
    assert len(t2['images']) == 10 and t2['corrupt'] == ['c/zz.png'] and 'b/09.png' in t2['files']
    assert t2['images'][t2['files'].index('b/09.png')][:, 0, 0].tolist() == [1, 2, 3]
    # different sizes need size=
    Image.new('RGB', (20, 20)).save(tmp_path / 'train' / 'a' / 'big.png')
    with pytest.raises(ValueError, match='pass size='):
        load_folder_tensors(tmp_path / 'train', cache=False)
    with pytest.warns(CorruptImageWarning, match='zz.png'):
        t3 = load_folder_tensors(tmp_path / 'train', size=8, cache=False)
    assert t3['images'].shape[1:] == (3, 8, 8)


def test_samples_dataset_and_tensors():
    ds = create_dataset('samples', size=32, repeats=3)
    n = len(ds.classes)
    assert len(ds) == 3 * n and ds[n + 1][1] == 1 and torch.equal(ds[n + 1][0], ds[1][0])
    t = dataset_tensors('samples', size=32)
    assert t['images'].shape == (n, 3, 32, 32)
    np.testing.assert_allclose(t['images'][1].float().numpy() / 255, ds[1][0].numpy(), atol=0.5 / 255 + 1e-6)


def test_channel_stats_against_numpy():
    x = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(x, chunk=8)
    a = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, a.mean((0, 2, 3)), atol=1e-10)
    np.testing.assert_allclose(std, a.std((0, 2, 3)), atol=1e-10)


# ---------------------------------------------------------------- per-image augmentations

@pytest.mark.parametrize('recipe,n_views', [('mae', 1), ('mfm', 1), ('famt', 1), ('moco', 2), ('folk', 2)])
def test_recipes_keep_range_and_shape(recipe, n_views):
    torch.manual_seed(0)
    img = torch.rand(3, 50, 70)
    for size in (32, 64):
        tf = make_transform(recipe, size)
        for _ in range(5):
            out = tf(img)
            assert len(out['views']) == n_views
            for v, box, fl in zip(out['views'], out['boxes'], out['flipped']):
                assert v.shape == (3, size, size) and v.dtype == torch.float32
                assert 0 <= v.min() and v.max() <= 1
                assert box.shape == (4,) and (0 <= box).all() and (box <= 1).all() and fl.dtype == torch.bool
    pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert make_transform(recipe, 32)(pil)['views'][0].shape == (3, 32, 32)


def test_recipe_contents_follow_the_papers():
    (mae,) = view_specs('mae', 224)
    assert mae.scale == (0.2, 1.0) and mae.flip_p == 0.5 and mae.interpolation == 'bicubic'
    assert mae.jitter_p == mae.gray_p == mae.blur_p == mae.solarize_p == 0
    q, k = view_specs('moco', 224)
    assert q == k and q.jitter == (0.4, 0.4, 0.4, 0.1) and (q.jitter_p, q.gray_p, q.blur_p) == (0.8, 0.2, 0.5)
    assert view_specs('moco', 32)[0].blur_p == 0  # no blur at CIFAR size
    u, v = view_specs('folk', 224)
    assert u != v and u.blur_p == 1.0 and v.blur_p == 0.1 and v.solarize_p == 0.2 and u.solarize_p == 0


def test_view_spec_and_loader_validation():
    for kw, msg in [(dict(size=0), 'size'), (dict(scale=(0, 1)), 'scale'), (dict(ratio=(2, 1)), 'ratio'),
                    (dict(flip_p=-0.1), 'flip_p'), (dict(jitter=(0.4, 0.4, 0.4)), 'jitter'),
                    (dict(interpolation='area'), 'interpolation')]:
        with pytest.raises(ValueError, match=msg): ViewSpec(**kw)
    with pytest.raises(ValueError, match="unknown recipe 'byol'"): view_specs('byol')
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match='rank must be < world_size'): GPUDataLoader(x, rank=2, world_size=2)
    with pytest.raises(ValueError, match='batch_size'): GPUDataLoader(x, batch_size=0)
    with pytest.raises(ValueError, match='no full batch'): GPUDataLoader(x, batch_size=8)
    with pytest.raises(ValueError, match='images must be'): GPUDataLoader(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match='targets must have one label'): GPUDataLoader(x, targets=[1, 2], batch_size=2)
    with pytest.raises(ValueError, match='boxes must be'): resized_crop(torch.rand(2, 3, 8, 8), torch.rand(3, 4), 4)
    with pytest.raises(TypeError, match='floating-point'): resized_crop(x, torch.rand(4, 4), 4)


@pytest.mark.parametrize('as_pil', [False, True])
def test_crop_box_is_the_crop_taken(as_pil):
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # H=37, W=53
    img = Image.fromarray(arr) if as_pil else torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    crop = RandomResizedCropFlip(24, scale=(0.1, 1.0))
    n_flipped = 0
    for _ in range(25):
        view, box, flipped = crop(img)
        px = box.numpy() * np.array([53, 37, 53, 37])
        np.testing.assert_allclose(px, px.round(), atol=1e-4)
        x0, y0, x1, y1 = px.round().astype(int)
        region = arr[y0:y1, x0:x1]                           # crop by slicing with the box
        if as_pil:
            ref = np.asarray(Image.fromarray(region).resize((24, 24), Image.BILINEAR), dtype=np.float32) / 255
        else:
            t = torch.from_numpy(region.copy()).permute(2, 0, 1).float() / 255
            ref = TF.resize(t, [24, 24], antialias=True).clamp(0, 1).permute(1, 2, 0).numpy()
        if flipped: ref = ref[:, ::-1]
        n_flipped += bool(flipped)
        np.testing.assert_allclose(view.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    assert 0 < n_flipped < 25


# ---------------------------------------------------------------- batched augmentations

def _ecdf_gap(a, b):
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side='right') / len(a)
    fb = np.searchsorted(np.sort(b), grid, side='right') / len(b)
    return np.abs(fa - fb).max()


@pytest.mark.parametrize('h,w', [(32, 32), (40, 60)])
def test_crop_boxes_follow_torchvision_distribution(h, w):
    n = 4000
    boxes = sample_crop_boxes(n, h, w, (0.2, 1.0), (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(0)).double()
    px = boxes * torch.tensor([w, h, w, h], dtype=torch.float64)
    assert torch.allclose(px, px.round(), atol=1e-4)
    px = px.round()
    assert (px[:, 0] >= 0).all() and (px[:, 1] >= 0).all() and (px[:, 2] <= w).all() and (px[:, 3] <= h).all()
    bw, bh = (px[:, 2] - px[:, 0]).numpy(), (px[:, 3] - px[:, 1]).numpy()
    assert (bw >= 1).all() and (bh >= 1).all()
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(1, h, w), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    rh, rw = ref[:, 2], ref[:, 3]
    # area fraction, aspect ratio and centre position: two-sample KS distance (critical value ~0.044 at p=0.001)
    assert _ecdf_gap(bw * bh / (h * w), rw * rh / (h * w)) < 0.05
    assert _ecdf_gap(bw / bh, rw / rh) < 0.05
    assert _ecdf_gap(px[:, 0].numpy() + bw / 2, ref[:, 1] + rw / 2) < 0.05


def test_crop_boxes_fallback_is_torchvisions_centre_crop():
    for h, w in [(10, 100), (100, 10)]:
        boxes = sample_crop_boxes(5, h, w, (0.9, 1.0), (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(0))
        i, j, bh, bw = RandomResizedCrop.get_params(torch.empty(1, h, w), [0.9, 1.0], [3 / 4, 4 / 3])
        expect = torch.tensor([j / w, i / h, (j + bw) / w, (i + bh) / h]).expand(5, 4)
        assert torch.allclose(boxes, expect.float(), atol=1e-6)


@pytest.mark.parametrize('hw,out', [((32, 32), (32, 32)), ((37, 52), (24, 30)), ((20, 28), (40, 40))])
def test_resized_crop_matches_torchvision_per_image(hw, out):
    h, w = hw
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, h, w, generator=g)
    boxes = sample_crop_boxes(12, h, w, (0.05, 1.0), generator=g)
    flipped = torch.rand(12, generator=g) < 0.5
    got = resized_crop(x, boxes, out, flipped)
    assert got.shape == (12, 3, *out)
    for i in range(12):
        x0, y0, x1, y1 = (boxes[i] * torch.tensor([w, h, w, h])).round().int().tolist()
        crop = x[i, :, y0:y1, x0:x1]
        if (y1 - y0, x1 - x0) == out: ref = crop  # no resampling at all
        else: ref = torch.nn.functional.interpolate(crop[None], size=out, mode='bilinear', align_corners=False)[0]
        ref2 = TF.resized_crop(x[i], y0, x0, y1 - y0, x1 - x0, list(out), antialias=False)
        assert torch.allclose(ref, ref2, atol=1e-6)
        if flipped[i]: ref = ref.flip(-1)
        assert torch.allclose(got[i], ref, atol=1e-5), i
    # maps (one channel, float64) and the whole-image box
    m = torch.rand(3, 1, 7, 7, dtype=torch.float64, generator=g)
    assert torch.allclose(resized_crop(m, torch.tensor([[0., 0., 1., 1.]] * 3), 7), m)


@pytest.mark.parametrize('src_hw,out', [((4, 4), (32, 32)), ((5, 7), (12, 9)), ((16, 16), (8, 8))])
def test_map_between_views_matches_the_per_pixel_reference(src_hw, out):
    g = torch.Generator().manual_seed(sum(src_hw) + sum(out))
    B = 10
    m = torch.randn(B, 2, *src_hw, generator=g, dtype=torch.float64)
    src, dst = sample_crop_boxes(B, 40, 50, (0.05, 1.0), generator=g), sample_crop_boxes(B, 40, 50, (0.05, 1.0), generator=g)
    dst[0] = src[0]                                            # one view onto itself: all inside
    dst[1] = torch.tensor([0.0, 0.0, 0.1, 0.1]); src[1] = torch.tensor([0.5, 0.5, 1.0, 1.0])   # disjoint crops
    fs, fd = torch.rand(B, generator=g) < 0.5, torch.rand(B, generator=g) < 0.5
    got, inside = map_between_views(m, src, dst, out, fs, fd)
    assert got.shape == (B, 2, *out) and got.dtype == torch.float32 and inside.shape == (B, 1, *out)
    for i in range(B):
        ref, ref_inside, on_edge = reference.map_between_views(m[i].numpy(), src[i].tolist(), dst[i].tolist(), out,
                                                               bool(fs[i]), bool(fd[i]))
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-5)
        np.testing.assert_array_equal(inside[i, 0].numpy()[~on_edge], ref_inside[~on_edge])
        assert on_edge.mean() < 0.3
    assert inside[0].all() and not inside[1].any()


def test_map_between_views_refuses_bad_input():
    m, boxes, fl = torch.rand(3, 1, 4, 4), sample_crop_boxes(3, 32, 32), torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r'src_boxes must be a float tensor \(B, 4\) = \(3, 4\)'):
        map_between_views(m, boxes[:2], boxes, 8)
    with pytest.raises(ValueError, match='dst_boxes must be a float tensor.*torch.int64'):
        map_between_views(m, boxes, (boxes * 32).long(), 8)
    with pytest.raises(ValueError, match=r'dst_flipped must be None or a bool tensor \(3,\)'):
        map_between_views(m, boxes, boxes, 8, fl, fl.float())
    with pytest.raises(ValueError, match='x1 > x0 and y1 > y0'):
        map_between_views(m, boxes, boxes.flip(-1), 8)
    with pytest.raises(ValueError, match="mode must be 'bilinear' or 'nearest'"):
        map_between_views(m, boxes, boxes, 8, mode='bicubic')
    with pytest.raises(ValueError, match='size must be a positive int'):
        map_between_views(m, boxes, boxes, 0)
    with pytest.raises(ValueError, match=r'x must be a 4-D batch \(B, C, H, W\)'):
        map_between_views(torch.rand(3, 4, 4), boxes, boxes, 8)


def test_color_jitter_matches_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    B = 16
    x = torch.rand(B, 3, 9, 11, generator=g)
    x[0] = x[0, :1]                             # a grey image
    x[1, :, :3] = torch.tensor([0.3, 0.3, 0.9])[:, None, None]  # ties of two channels
    lo, hi = torch.tensor([0.6, 0.6, 0.6, -0.1]), torch.tensor([1.4, 1.4, 1.4, 0.1])
    factors = lo + (hi - lo) * torch.rand(B, 4, generator=g)
    order = torch.rand(B, 4, generator=g).argsort(1)
    order[-1, 1:] = -1                          # skipped steps: only the first operation
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for subset in (True, False):                # per-subset (CPU default) and whole-batch (GPU default) paths
        got = color_jitter(x, factors, order, subset)
        for i in range(B):
            ref = x[i]
            for o in order[i].tolist():
                if o >= 0: ref = fns[o](ref, factors[i, o].item())
            assert torch.allclose(got[i], ref, atol=2e-5), (subset, i)


def test_gaussian_blur_matches_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 17, generator=g)
    sigma = 0.1 + 1.9 * torch.rand(6, generator=g)
    for k in (3, 9):
        got = gaussian_blur(x, sigma, k)
        for i in range(6):
            assert torch.allclose(got[i], TF.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2), atol=1e-5)
    with pytest.raises(ValueError, match='kernel_size'): gaussian_blur(x, sigma, 4)


def test_augment_batch_probabilities():
    n = 2500
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    sd = lambda p: math.sqrt(p * (1 - p) / n)
    # flip: the returned flags follow flip_p, and the view is the mirrored crop exactly when flagged
    v, boxes, flipped = augment_batch(x, ViewSpec(8, flip_p=0.3), g)
    assert abs(flipped.float().mean() - 0.3) < 5 * sd(0.3)
    assert torch.allclose(v, resized_crop(x, boxes, 8, flipped), atol=1e-6)
    # grayscale: channels equal in about gray_p of the views
    v, _, _ = augment_batch(x, ViewSpec(8, gray_p=0.2), g)
    grey = (v.amax(1) - v.amin(1)).amax((1, 2)) < 1e-6
    assert abs(grey.float().mean() - 0.2) < 5 * sd(0.2)
    # colour jitter changes about jitter_p of the views; solarize inverts the bright pixels of about solarize_p
    v, boxes, flipped = augment_batch(x, ViewSpec(8, jitter_p=0.8), g)
    changed = (v - resized_crop(x, boxes, 8, flipped)).abs().amax((1, 2, 3)) > 1e-4
    assert abs(changed.float().mean() - 0.8) < 5 * sd(0.8)
    v, boxes, flipped = augment_batch(x, ViewSpec(8, solarize_p=0.25), g)
    base = resized_crop(x, boxes, 8, flipped)
    sol = torch.where(base >= 0.5, 1 - base, base)
    is_sol = (v - sol).abs().amax((1, 2, 3)) < 1e-6
    assert (((v - base).abs().amax((1, 2, 3)) < 1e-6) | is_sol).all()
    assert abs(is_sol.float().mean() - 0.25) < 5 * sd(0.25)
    # everything at once stays in [0, 1]
    for recipe in ('moco', 'folk'):
        for spec in view_specs(recipe, 64):
            v, _, _ = augment_batch((x[:64] * 255).to(torch.uint8), spec, g)
            assert v.shape == (64, 3, 64, 64) and v.min() >= 0 and v.max() <= 1


# ---------------------------------------------------------------- the device-resident loader

def _images(n=50, h=20, w=24, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_gpu_loader_crop_matches_torchvision_reference():
    imgs = _images()
    spec = ViewSpec(16, scale=(0.1, 1.0), interpolation='bilinear')
    dl = GPUDataLoader(imgs, views=[spec, spec], batch_size=10, seed=3, device='cpu')
    for b in dl:
        for v, boxes, flipped in zip(b['views'], b['boxes'], b['flipped']):
            for k, i in enumerate(b['index'].tolist()):
                x0, y0, x1, y1 = (boxes[k] * torch.tensor([24, 20, 24, 20])).round().int().tolist()
                ref = TF.resized_crop(imgs[i].float() / 255, y0, x0, y1 - y0, x1 - x0, [16, 16], antialias=False)
                if flipped[k]: ref = TF.horizontal_flip(ref)
                assert torch.allclose(v[k], ref, atol=1e-5)


def test_gpu_loader_is_seeded():
    imgs = _images()
    batches = lambda seed, **kw: list(GPUDataLoader(imgs, torch.arange(50), 'moco', batch_size=8, seed=seed, size=16, **kw))
    a, b, c = batches(0), batches(0), batches(1)
    assert len(a) == 6
    for x, y in zip(a, b):
        assert torch.equal(x['index'], y['index']) and all(torch.equal(u, v) for u, v in zip(x['views'], y['views']))
        assert torch.equal(x['target'], x['index'])
    assert not torch.equal(torch.cat([x['index'] for x in a]), torch.cat([x['index'] for x in c]))
    dl = GPUDataLoader(imgs, views='mae', batch_size=8, seed=0, size=16)
    e0, e1 = [torch.cat([b['index'] for b in dl]) for _ in range(2)]  # iter() moves to the next epoch
    assert not torch.equal(e0, e1)
    dl.set_epoch(0)
    assert torch.equal(torch.cat([b['index'] for b in dl]), e0)
    plain = GPUDataLoader(imgs, views='mae', batch_size=8, shuffle=False, size=16)
    assert torch.cat([b['index'] for b in plain]).tolist() == list(range(48))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_gpu_loader_epochs_start_and_run_without_a_stream_sync():
    """On a GPU every batch of an epoch, the first one included (the epoch's order is copied from the CPU then), is
    made without waiting for the device: CUDA's sync debug mode turns any synchronising call into an error."""
    dl = GPUDataLoader(_images(), torch.arange(50), 'moco', batch_size=8, size=16, device='cuda', fused_augment=False)
    ref = [b['index'].cpu() for b in dl]                   # epoch 0: one-time caches (jitter ranges) made here
    dl.set_epoch(0)
    torch.cuda.set_sync_debug_mode('error')
    try: got = [b['index'] for b in dl]
    finally: torch.cuda.set_sync_debug_mode('default')
    assert len(got) == len(ref) and all(torch.equal(g.cpu(), r) for g, r in zip(got, ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_device_color_loader_draws_the_colour_without_a_stream_sync(tmp_path):
    """Image folders with `color_on_device`: the workers' uint8 crops go to the GPU from pinned memory and get their
    colour there, batch after batch, without a synchronising call (CUDA's sync debug mode makes one an error)."""
    write_folder(tmp_path / 'imgs', classes=('a', 'b'), n=8, size=(20, 24))
    dl = create_loader(tmp_path / 'imgs', recipe='moco', size=16, batch_size=4, resident=False, num_workers=0,
                       device='cuda', color_on_device=True, fused_augment=False)
    assert isinstance(dl, D.DeviceColorLoader)
    ref = [b['views'][0].cpu() for b in dl]                # epoch 0: one-time caches (jitter ranges) made here
    dl.set_epoch(0)
    torch.cuda.set_sync_debug_mode('error')
    try: got = [b['views'][0] for b in dl]
    finally: torch.cuda.set_sync_debug_mode('default')
    assert len(got) == len(ref) == 4 and all(g.is_cuda and torch.equal(g.cpu(), r) for g, r in zip(got, ref))


@pytest.mark.parametrize('drop_last', [True, False])
def test_gpu_loader_shards_partition_the_epoch(drop_last):
    imgs, ws = _images(), 3
    loaders = [GPUDataLoader(imgs, views='mae', batch_size=4, seed=5, rank=r, world_size=ws, drop_last=drop_last, size=8)
               for r in range(ws)]
    per_rank = [torch.cat([b['index'] for b in l]) for l in loaders]
    for l, idx in zip(loaders, per_rank):
        assert len(l) == (4 if drop_last else 5)
        assert len(idx) == (16 if drop_last else 17)
    full = [l.epoch_indices(0) for l in loaders]
    assert len({len(f) for f in full}) == 1
    every = torch.cat(full)
    if drop_last:
        assert len(every) == 48 and len(set(every.tolist())) == 48  # disjoint
        assert torch.equal(torch.cat(per_rank), torch.cat([f[:16] for f in full]))
    else:
        assert len(every) == 51 and set(every.tolist()) == set(range(50))  # covers all, one padded repeat
        assert sorted(Counter(every.tolist()).values()) == [1] * 49 + [2]
    # the ranks interleave one common order, as DistributedSampler does
    order = torch.stack(full, 1).reshape(-1)
    assert len(set(order.tolist())) == (48 if drop_last else 50)


def test_gpu_loader_epoch_size_repeats_small_datasets():
    imgs = _images(n=7)
    dl = GPUDataLoader(imgs, views='mae', batch_size=5, epoch_size=35, size=8)
    idx = torch.cat([b['index'] for b in dl])
    assert len(dl) == 7 and sorted(Counter(idx.tolist()).values()) == [5] * 7


@pytest.mark.parametrize('color_on_device', [False, True])
def test_cpu_and_device_loaders_yield_the_same_format(color_on_device):
    gpu = create_loader('samples', recipe='folk', size=32, batch_size=5, device='cpu', seed=0)
    cpu = create_loader('samples', recipe='folk', size=32, batch_size=5, resident=False, num_workers=0, seed=0,
                        device='cpu', color_on_device=color_on_device)
    assert isinstance(cpu, D.DeviceColorLoader) == color_on_device
    bg, bc = next(iter(gpu)), next(iter(cpu))
    assert sorted(bg) == sorted(bc) == ['boxes', 'flipped', 'index', 'target', 'views']
    for k in ('views', 'boxes', 'flipped'):
        assert [(t.shape, t.dtype) for t in bg[k]] == [(t.shape, t.dtype) for t in bc[k]]
    for k in ('target', 'index'):
        assert bg[k].shape == bc[k].shape and bg[k].dtype == bc[k].dtype == torch.int64
    assert len(gpu) == len(cpu) == len(D.sample_names()) // 5


# ---------------------------------------------------------------- exact resume on an image folder (CPU loader)

def _folder_run(folder, out, stop_at=None, resume=False, num_workers=0, color_on_device=False):
    import sys
    sys.path.insert(0, str(Path(__file__).parent / 'scripts'))
    from toy import NoisyToy
    from folk_nb.trainer import Trainer, TrainConfig
    torch.manual_seed(0)
    model = NoisyToy()
    loader = create_loader(folder, recipe='moco', size=8, batch_size=4, resident=False, num_workers=num_workers, seed=5,
                           device='cpu', color_on_device=color_on_device)
    t = Trainer(model, loader, TrainConfig(epochs=3, lr=5e-3, warmup_steps=1, out_dir=str(out), progress=False,
                                          log_every=1, deterministic=True))
    if resume:
        torch.manual_seed(123); torch.rand(10)  # a new process would have other RNG states
        t.resume()
    return model, t.fit(stop_at=stop_at)


@pytest.mark.parametrize('color_on_device', [False, True])   # colour in the workers, or drawn per batch on the device
@pytest.mark.parametrize('stop_at', [3, 6])  # mid-epoch 0, and mid-epoch 1 (3 batches per epoch)
def test_image_folder_resume_is_bit_identical(tmp_path, stop_at, color_on_device):
    write_folder(tmp_path / 'imgs', classes=('a', 'b'), n=6, size=(10, 10))
    straight, s = _folder_run(tmp_path / 'imgs', tmp_path / 'a', color_on_device=color_on_device)
    _, p = _folder_run(tmp_path / 'imgs', tmp_path / 'b', stop_at=stop_at, color_on_device=color_on_device)
    assert p['status'] == 'paused' and p['steps'] == stop_at
    resumed, r = _folder_run(tmp_path / 'imgs', tmp_path / 'b', resume=True, color_on_device=color_on_device)
    assert s['steps'] == r['steps'] == 9
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize('color_on_device', [False, True])
def test_image_folder_views_do_not_depend_on_workers_or_global_rng(tmp_path, color_on_device):
    write_folder(tmp_path / 'imgs', classes=('a', 'b'), n=4, size=(10, 10))
    def batches(nw, seed):
        torch.manual_seed(seed)
        dl = create_loader(tmp_path / 'imgs', recipe='moco', size=8, batch_size=4, resident=False, num_workers=nw, seed=1,
                           device='cpu', color_on_device=color_on_device)
        dl.set_epoch(1)
        return [b['views'][1] for b in dl]
    a = batches(0, 0)
    for b in (batches(0, 99), batches(2, 7)):
        assert len(a) == len(b) == 2 and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- folder cache: validity, location; corrupt and tiny images

def test_cache_rebuilt_when_a_file_changes_under_the_same_name(tmp_path, capsys):
    paths = write_folder(tmp_path / 'f', n=2)
    first = load_folder_tensors(tmp_path / 'f')
    note = capsys.readouterr().out
    assert "note: 6 images of" in note and "cached in" in note and str(tmp_path / 'f.native.uint8.pt') in note
    again = load_folder_tensors(tmp_path / 'f')
    assert torch.equal(again['images'], first['images']) and capsys.readouterr().out == ''  # reused: silent
    st = paths[0].stat()
    Image.new('RGB', (16, 12), (7, 8, 9)).save(paths[0])                    # repaired / rewritten, same name
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    t = load_folder_tensors(tmp_path / 'f')
    assert t['images'][0, :, 0, 0].tolist() == [7, 8, 9] and not torch.equal(t['images'], first['images'])
    paths[1].write_bytes(paths[1].read_bytes() + b'\0')                       # size changes, mtime kept
    os.utime(paths[1], ns=(st.st_atime_ns, paths[1].stat().st_mtime_ns))
    capsys.readouterr()
    load_folder_tensors(tmp_path / 'f')
    assert 'cached in' in capsys.readouterr().out


def test_cache_falls_back_to_user_cache_dir_when_parent_is_not_writable(tmp_path, monkeypatch, capsys):
    write_folder(tmp_path / 'ro' / 'f', n=2)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    real_save = torch.save
    def save(obj, f, *a, **k):  # the folder's parent refuses writes, as a read-only mount would
        if Path(getattr(f, 'name', f)).parent == tmp_path / 'ro': raise PermissionError(13, 'Permission denied', str(f))  # a path or an open file
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save)
    t = load_folder_tensors(tmp_path / 'ro' / 'f')
    out = capsys.readouterr().out
    cached = list((tmp_path / 'xdg' / 'folk_nb').glob('*-f.native.uint8.pt'))
    assert len(cached) == 1 and str(cached[0]) in out and not list((tmp_path / 'ro').glob('*.pt'))
    assert torch.equal(load_folder_tensors(tmp_path / 'ro' / 'f')['images'], t['images']) and capsys.readouterr().out == ''
    # nowhere writable: a warning, and the images all the same
    monkeypatch.setattr(torch, 'save', lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, 'Permission denied')))
    with pytest.warns(UserWarning, match='could not write a cache'):
        t8 = load_folder_tensors(tmp_path / 'ro' / 'f', size=8)
    assert t8['images'].shape == (6, 3, 8, 8) and not list((tmp_path / 'xdg' / 'folk_nb').glob('*-f.8.uint8.pt'))


def test_corrupt_images_reported_in_one_line_and_all_corrupt_is_a_value_error(tmp_path):
    paths = write_folder(tmp_path / 'f', n=4)
    for p in paths[:8]: p.write_bytes(b'garbage')
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        t = load_folder_tensors(tmp_path / 'f', cache=False)
    msgs = [str(w.message) for w in rec if issubclass(w.category, CorruptImageWarning)]
    assert len(t['images']) == 4 and len(t['corrupt']) == 8 and len(msgs) == 1 and msgs[0].startswith('skipped 8 corrupt')
    ds = ImageFolderDataset(tmp_path / 'f')
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        [ds[i] for i in range(len(ds))]
    msgs = [str(w.message) for w in rec if issubclass(w.category, CorruptImageWarning)]
    assert ds.n_corrupt == 8 and len(msgs) == 5 and 'further corrupt images are skipped silently' in msgs[-1]
    with pytest.warns(CorruptImageWarning, match='8 of the 12 files') as rec:
        assert ImageFolderDataset(tmp_path / 'f', verify=True).n_corrupt == 8
    assert len([w for w in rec if issubclass(w.category, CorruptImageWarning)]) == 1
    for p in paths[8:]: p.write_bytes(b'garbage')
    for make in (lambda: ImageFolderDataset(tmp_path / 'f')[0], lambda: ImageFolderDataset(tmp_path / 'f', verify=True),
                 lambda: load_folder_tensors(tmp_path / 'f', cache=False)):
        with pytest.raises(ValueError, match='every one of the 12 images .* is corrupt or unreadable'), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            make()


def test_tiny_images_upscaled_more_than_2x_warn_once_with_the_count(tmp_path):
    write_folder(tmp_path / 'f', n=2, size=(3, 3))
    write_folder(tmp_path / 'f', classes=('d',), n=2, size=(20, 20), seed=1)
    def upscale_warnings(fn):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter('always')
            fn()
        return [str(w.message) for w in rec if 'upscaled more than 2x' in str(w.message)]
    w = upscale_warnings(lambda: load_folder_tensors(tmp_path / 'f', size=32, cache=False))
    assert len(w) == 1 and w[0].startswith('6 of the 8 images') and '32 px' in w[0]
    w = upscale_warnings(lambda: create_dataset(tmp_path / 'f', recipe='mae', size=32))
    assert len(w) == 1 and w[0].startswith('6 of the 8 images')
    assert upscale_warnings(lambda: load_folder_tensors(tmp_path / 'f', size=6, cache=False)) == []
    assert upscale_warnings(lambda: create_dataset(tmp_path / 'f', recipe='mae', size=6)) == []


def test_first_use_shows_progress_and_a_summary_reuse_is_silent(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv('FOLK_NB_CIFAR10_ARCHIVE', raising=False)
    _tiny_cifar_archive(tmp_path / 'tiny.tar.gz', n=1)
    prepare_cifar10(tmp_path / 'data', archive=tmp_path / 'tiny.tar.gz')
    out, err = capsys.readouterr()
    assert out.startswith('note: extracted 20 files of') and out.count('\n') == 1 and 'extracting tiny.tar.gz' in err
    prepare_cifar10(tmp_path / 'data', archive=tmp_path / 'tiny.tar.gz')
    dataset_tensors('cifar10', 'test', root=tmp_path / 'data')
    out, err = capsys.readouterr()
    assert out.startswith('note: 10 images of') and 'cached in' in out and out.count('\n') == 1
    dataset_tensors('cifar10', 'test', root=tmp_path / 'data')   # extracted and cached: nothing printed
    assert capsys.readouterr() == ('', '')
    # a folder large enough to take a while gets a decoding bar
    (tmp_path / 'big' / 'x').mkdir(parents=True)
    for i in range(1000): Image.new('RGB', (2, 2), (i % 256, 0, 0)).save(tmp_path / 'big' / 'x' / f'{i:04d}.png')
    load_folder_tensors(tmp_path / 'big', cache=False)
    out, err = capsys.readouterr()
    assert 'decoding big' in err and out.startswith("note: 1,000 images of") and 'decoded in' in out


@pytest.mark.parametrize('recipe', ['moco', 'folk', 'mae'])
def test_device_path_of_a_view_makes_no_host_sync(recipe):
    "subset=False (the GPU path): `host_syncs` finds no host read and no tensor made from Python numbers on the device."
    x = D.dataset_tensors('samples', size=40)['images'][:6]
    for spec in D.view_specs(recipe, 32):
        D.augment_batch(x, spec, torch.Generator().manual_seed(0), subset=False)           # caches the ranges
        out = []
        syncs = host_syncs(lambda: out.append(D.augment_batch(x, spec, torch.Generator().manual_seed(1), subset=False)))
        assert syncs == {}, (recipe, dict(syncs))
        eager = out[0]
        cpu = D.augment_batch(x, spec, torch.Generator().manual_seed(1), subset=True)       # the CPU path: same views
        torch.testing.assert_close(eager[0], cpu[0], atol=1e-5, rtol=0)
    assert D._jitter_bounds(tuple(D.view_specs('moco', 32)[0].jitter), torch.device('cpu'))[0].shape == (4,)


def test_equal_views_are_drawn_in_one_call(monkeypatch):
    "MoCo's two views (one recipe) come from one augment_batch call on the batch repeated: about half the ops."
    import functools
    monkeypatch.setattr(D, 'augment_batch', functools.partial(D.augment_batch, subset=False))   # the GPU path
    imgs = D.dataset_tensors('samples', size=32)['images']
    counts = {}
    for label, groups in (('merged', D._spec_groups), ('per view', lambda specs: [(s, 1) for s in specs])):
        monkeypatch.setattr(D, '_spec_groups', groups)
        loader = GPUDataLoader(imgs, views='moco', batch_size=16, epoch_size=48, device='cpu', size=32, seed=0,
                               fused_augment=False)
        it = iter(loader); b0 = next(it)
        with AtenOps() as c: next(it)
        counts[label] = len(c.seen)
        assert len(b0['views']) == 2 and b0['views'][0].shape == (16, 3, 32, 32)
        assert not torch.equal(b0['boxes'][0], b0['boxes'][1])
    assert counts['merged'] < 0.6 * counts['per view'], counts
    assert [k for _, k in D._spec_groups(D.view_specs('folk', 32))] == [1, 1]      # different recipes: two calls


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_with_the_same_result(tmp_path):
    "_decode (dataset_tensors, FolderBatches): a photo 5x the target size decodes at 1/4 scale (JPEG draft); the square it"
    " returns matches the full decode's to a few grey levels, and the upscale check still sees the file's own size."
    from PIL import ImageOps
    from folk_nb.data import _decode, read_rgb
    from folk_nb.images import sample_images
    x = sample_images(['astronaut'], 400)[0]
    big = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).resize((1600, 1200), Image.BICUBIC)
    big.save(tmp_path / 'big.jpg', quality=95)
    a, short = _decode(str(tmp_path / 'big.jpg'), 64)
    full = np.asarray(ImageOps.fit(read_rgb(tmp_path / 'big.jpg'), (64, 64), Image.BICUBIC)).astype(float)
    assert short == 1200 and a.shape == (64, 64, 3)
    assert read_rgb(tmp_path / 'big.jpg', 64).size == (200, 150)               # 1/8: the sides stay >= 64
    assert np.abs(a - full).mean() < 3 and np.abs(a - full).max() < 40


def test_training_views_of_a_large_photo_come_from_a_reduced_decode(tmp_path):
    "Folder datasets with a recipe read files with CropReader: a 2400 x 1800 JPEG for 32 px MoCo crops decodes at 1/8."
    from folk_nb.data import CropReader
    from folk_nb.images import sample_images
    x = sample_images(['coffee'], 300)[0]
    (tmp_path / 'c').mkdir()
    Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).resize((2400, 1800)).save(tmp_path / 'c' / '0.jpg')
    ds = create_dataset(tmp_path, recipe='moco', size=32, with_color=False)
    assert isinstance(ds.base.loader, CropReader) and ds.base.loader.reduction(2400, 1800) == 8
    assert ds.base.loader(str(tmp_path / 'c' / '0.jpg')).size == (300, 225)
    item = ds[(0, 3)]
    assert [v.shape for v in item['views']] == [(3, 32, 32)] * 2 and all(v.dtype == torch.uint8 for v in item['views'])
