"""Image folders: worker processes that draw each view's colour per image, against workers that only decode, crop and
flip (uint8) while `DeviceColorLoader` draws the colour batched on the device (`create_loader(color_on_device=)`).

    python bench/folder_loader.py [--device cuda] [--recipes moco,folk,mae] [--size 224] [--batch 64] [--workers 2]
                                  [--images 256] [--photo 500x375] [--no-save]

Writes a folder of JPEG photos (the embedded sample pictures at `--photo` size, by default 500 x 375 px, the shape of
a typical ImageNet photo, repeated to `--images` files) to a temporary directory, then for each recipe, in the same run:

- **per image** (one process, no workers): the milliseconds to decode one file and make all of its views, with the
  colour drawn per image (`with_color=True`, torchvision's transforms) and with crop + flip only
  (`with_color=False`). This is the CPU time a worker spends per image: a GPU that trains at R images/s needs about
  R x ms / 1000 worker cores to be fed. Also crop + flip only with every file decoded in full, against the reduced
  decode of large JPEGs that the folder datasets use (`CropReader`: the same for 500 x 375 photos, not for a
  camera's 3000 x 2000 ones);
- **end to end**: images/s of `create_loader(..., resident=False)` over one epoch after a warm-up epoch, with
  `--workers` worker processes, colour in the workers vs colour on `--device` (the device's colour ops included:
  synchronised at the end of the epoch).

On a CPU-only machine the "device" is the CPU too: the main process draws the colour of whole batches while the
workers crop, on the same cores, so the end-to-end ratio there says what batching the colour buys on a CPU, not
what a GPU does. Appends one JSON line per recipe to bench/results/folder_loader.jsonl (`--no-save`: don't).
"""
import argparse, sys, tempfile, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_rows, command_line, device_words, load_average, load_pair, warn_if_busy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results' / 'folder_loader.jsonl'
PHOTO = (500, 375)   # width, height


def write_photos(root: Path, n: int, photo: tuple = PHOTO) -> Path:
    "`n` JPEG files of `photo` size (width, height) in root/all/ (the sample pictures, repeated); returns root."
    from PIL import Image
    from folk_nb.images import sample_images, to_uint8_image
    pics = sample_images(size=min(max(photo), 1024))
    (root / 'all').mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(to_uint8_image(pics[i % len(pics)])).resize(photo, Image.BICUBIC).save(
            root / 'all' / f'{i:05d}.jpg', quality=90)
    return root


def ms_per_image(folder: Path, recipe: str, size: int, with_color: bool, n: int = 24, full_decode: bool = False) -> float:
    "Median milliseconds for one item (decode + all views) of the folder dataset, in this process."
    from folk_nb.data import create_dataset, read_rgb
    ds = create_dataset(folder, recipe=recipe, size=size, with_color=with_color)
    if full_decode: ds.base.loader = read_rgb                       # every file decoded at its full size
    for i in range(3): ds[(i, i)]                                   # warm-up
    times = []
    for i in range(n):
        t = time.perf_counter(); ds[(i % len(ds), 100 + i)]; times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000


def images_per_second(folder: Path, recipe: str, size: int, batch: int, workers: int, device: torch.device,
                      color_on_device: bool) -> float:
    "Images/s over the second epoch of the worker loader (the first one starts the workers and compiles)."
    from folk_nb.data import create_loader
    loader = create_loader(folder, recipe=recipe, size=size, batch_size=batch, resident=False, num_workers=workers,
                           device=device, color_on_device=color_on_device, seed=0)
    for _ in loader: pass
    if device.type == 'cuda': torch.cuda.synchronize(device)
    t, n = time.perf_counter(), 0
    for b in loader:
        n += len(b['index'])
        if not color_on_device: [v.to(device, non_blocking=True) for v in b['views']]   # the trainer's copy
    if device.type == 'cuda': torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--recipes', default='moco,folk,mae')
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--images', type=int, default=256, help='JPEG files in the folder (a multiple of --batch)')
    ap.add_argument('--photo', default='500x375', help='width x height of the JPEG files')
    ap.add_argument('--no-save', action='store_true')
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    photo = tuple(int(v) for v in a.photo.lower().split('x'))
    if len(photo) != 2 or min(photo) < 1: ap.error(f"--photo must be WIDTHxHEIGHT, e.g. 500x375, got {a.photo!r}")
    load0, rows = load_average(), []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_photos(Path(tmp) / 'photos', a.images, photo)
        for recipe in [r for r in a.recipes.split(',') if r]:
            per = {c: ms_per_image(folder, recipe, a.size, c) for c in (True, False)}
            full = ms_per_image(folder, recipe, a.size, False, full_decode=True)
            ips = {c: images_per_second(folder, recipe, a.size, a.batch, a.workers, device, c) for c in (False, True)}
            row = dict(recipe=recipe, ms_per_image_color_in_worker=round(per[True], 2),
                       ms_per_image_crop_only=round(per[False], 2), worker_cost_ratio=round(per[True] / per[False], 2),
                       ms_per_image_crop_only_full_decode=round(full, 2),
                       img_s_color_in_workers=round(ips[False], 1), img_s_color_on_device=round(ips[True], 1),
                       speedup=round(ips[True] / ips[False], 2))
            print(f"{recipe:<5} per image: colour in the worker {row['ms_per_image_color_in_worker']:7.2f} ms, crop only "
                  f"{row['ms_per_image_crop_only']:6.2f} ms ({row['worker_cost_ratio']:.1f}x; {full:.2f} ms decoding in full); "
                  f"end to end with {a.workers} "
                  f"workers: {row['img_s_color_in_workers']:7.1f} -> {row['img_s_color_on_device']:7.1f} img/s "
                  f"({row['speedup']:.2f}x)", flush=True)
            rows.append(row)
    where = device_words(device)
    load1 = load_average()
    print(f"\n{where}; {a.images} JPEGs of {photo[0]} x {photo[1]} px, views of {a.size} px, batch {a.batch}, "
          f"{a.workers} workers, torch {torch.__version__}")
    warn_if_busy(load0, load1, 1.0, "other work shared the cores: the images/s are low, the per-image ratios hold better")
    if not a.no_save:
        append_rows(RESULTS, rows, 'folder_loader', command_line('bench/folder_loader.py', argv), where, size=a.size,
                    batch=a.batch, workers=a.workers, images=a.images, photo=list(photo), torch=torch.__version__,
                    load=load_pair(load0, load1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
