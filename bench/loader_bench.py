"""Loader benchmark: prints images/s of the seed-style fastai loader and of `pcam_dataloaders` on an array cache,
the per-core rate of the stage that feeds the device, and the peak RSS while iterating a 220,025-patch cache.

    python bench/loader_bench.py [--n-files 2000] [--big 220025] [--workdir /tmp/pcam-bench]

Settings (from issue 3): bs 64, size 224, CPU, 10 batches after a warm-up. The 220k cache is synthetic
(random patches written straight into the cache format: 6.1 GB on disk), so it fits on a machine without Kaggle.
"""
import argparse, os, tempfile, time, warnings
from pathlib import Path

warnings.filterwarnings('ignore')
import numpy as np
import torch


def rate(dl, n_batches=10, warmup=2):
    "Model-ready images/s over `n_batches` after `warmup` batches"
    it = iter(dl)
    for _ in range(warmup): next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches): n += len(next(it)[0])
    return n / (time.perf_counter() - t0)


def vm(key):
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key): return int(line.split()[1]) / 1024  # MiB
    return float('nan')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n-files', type=int, default=2000)
    ap.add_argument('--big', type=int, default=220_025)
    ap.add_argument('--workdir', default=None)
    ap.add_argument('--bs', type=int, default=64)
    ap.add_argument('--size', type=int, default=224)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix='pcam-bench-'))
    from fastai.vision.data import ImageDataLoaders
    from fastai.vision.augment import Resize, aug_transforms
    from fastai.data.transforms import Normalize
    from fastai.vision.core import imagenet_stats
    from pcam_fastai.data import make_synthetic_pcam
    from pcam_fastai.sources import pcam_dataloaders
    from pcam_fastai.cache import build_cache, load_cache
    from pcam_fastai.loader import PatchArrays

    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; bs {a.bs}, size {a.size}, CPU')
    data = make_synthetic_pcam(work/'files', n_train=a.n_files, n_test=10, seed=0, show_progress=False)

    # 1. the seed-style fastai loader (what the reference notebook does)
    seed = ImageDataLoaders.from_csv(data, folder='train', csv_fname='train_labels.csv', suff='.tif', bs=a.bs, device='cpu',
                                     item_tfms=Resize(a.size), batch_tfms=[*aug_transforms(flip_vert=True), Normalize.from_stats(*imagenet_stats)])
    r_seed = rate(seed.train)
    dl0 = seed.train.new(num_workers=0)
    idx = list(range(a.bs * 4))
    t0 = time.perf_counter()
    for i in range(0, len(idx), a.bs): dl0.do_batch([dl0.do_item(j) for j in idx[i:i+a.bs]])
    r_seed_item = len(idx) / (time.perf_counter() - t0)
    print(f'seed-style fastai loader (from_csv, Resize({a.size}), aug_transforms, Normalize): {r_seed:8,.0f} img/s')
    print(f'  its per-item stage (decode, resize, collate), 1 process:               {r_seed_item:8,.0f} img/s')

    # 2. the cache
    t0 = time.perf_counter()
    build_cache(data, work/'cache', force=True, show_progress=False)
    print(f'build_cache on {a.n_files} TIFFs: {a.n_files / (time.perf_counter() - t0):,.0f} patches/s')
    dls = pcam_dataloaders(work/'cache', size=a.size, bs=a.bs, device='cpu')
    r_fast = rate(dls.train, n_batches=10)
    print(f'pcam_dataloaders on the cache (gather, dihedral, crop, uint8 resize, normalize): {r_fast:8,.0f} img/s '
          f'= {r_fast / r_seed:.1f}x the seed-style loader')

    # 3. the stage that feeds the device, and RSS, on a 220,025-patch cache
    big = work/'big'
    if not (big/'train'/'manifest.json').exists():
        from pcam_fastai.cache import Source, build_split
        rng = np.random.default_rng(0)
        block = rng.integers(0, 256, (4096, 96, 96, 3), dtype=np.uint8)
        src = Source('train', [str(i) for i in range(a.big)], rng.integers(0, 2, a.big), lambda i0, i1: (block[np.arange(i0, i1) % len(block)], []),
                     'synthetic-big', 'kaggle')
        t0 = time.perf_counter()
        build_split(src, big, chunk=4096, verify=8, show_progress=False)
        print(f'wrote a synthetic {a.big:,}-patch cache ({a.big * 96 * 96 * 3 / 2**30:.1f} GiB) in {time.perf_counter() - t0:.0f} s')
    c = load_cache(big, 'train')
    ds = PatchArrays(c.images, c.labels, np.arange(a.big))
    torch.set_num_threads(1)
    rss0 = vm('VmRSS')
    for epoch in (1, 2):
        if epoch == 2:  # what a second epoch sees when the cache fits in RAM: read it once in order
            for i in range(0, a.big, 8192): ds.read_rows(np.arange(i, min(i + 8192, a.big)))
        perm = np.random.default_rng(epoch).permutation(a.big)
        t0, n = time.perf_counter(), 0
        for i in range(0, a.big - a.bs + 1, a.bs):
            x, y = ds.batch(perm[i:i + a.bs]); n += len(x)
        dt = time.perf_counter() - t0
        print(f'device-feeding stage (uint8 96 px batches gathered from the cache), 1 core, shuffled epoch {epoch} of {n:,}: '
              f'{n / dt:10,.0f} img/s' + (' (as found: pages may come from disk)' if epoch == 1 else ' (warm: the cache is in the page cache)'))
    sub = np.random.default_rng(3).permutation(32_768)
    ds.read_rows(np.sort(sub))  # bring these 0.9 GB into the page cache
    t0 = time.perf_counter()
    for i in range(0, len(sub) - a.bs + 1, a.bs): ds.batch(sub[i:i + a.bs])
    print(f'device-feeding stage, 1 core, shuffled pass over 32,768 patches already in the page cache (CPU cost alone): '
          f'{len(sub) // a.bs * a.bs / (time.perf_counter() - t0):10,.0f} img/s')
    print(f'RSS: {rss0:,.0f} MiB before the epochs, {vm("VmRSS"):,.0f} MiB after, peak of the whole run {vm("VmHWM"):,.0f} MiB')


if __name__ == '__main__':
    main()
