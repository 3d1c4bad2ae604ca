"""Cohort throughput: the same cohort of mosaic slides (real PCam tiles) with 1 and with 2 local Dask workers, side by side.

    python bench/cohort_bench.py                        # 8 slides of 16 x 16 tiles from the committed real tiles, CPU
    python bench/cohort_bench.py --slides 16 --side 32 --device cuda --workers 1,2,4

The model is a bundle written by hand (regnetx_002 with random weights): throughput does not depend on what the weights learnt.
Each configuration writes into its own folder, so nothing is reused between them; the table gives tiles classified per second
of wall time (reading, tissue detection and inference of all slides, and the workers' start-up, which a real cohort amortizes).
"""
from __future__ import annotations
import argparse, sys, tempfile, time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pcam_fastai.cohort import run_cohort  # noqa: E402
from pcam_fastai.export import build_model  # noqa: E402
from pcam_fastai.runs import BundleMeta, write_bundle_meta  # noqa: E402
from pcam_fastai.testslides import make_mosaic_slide  # noqa: E402


def hand_bundle(dest:Path, arch:str='regnetx_002') -> Path:
    "A bundle of `arch` with random weights (one view, no ONNX)"
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0); torch.save(build_model(arch, 2).state_dict(), dest/'weights.pth')
    write_bundle_meta(dest, BundleMeta.from_dict(dict(format=1, arch=arch, classes=['normal', 'tumour'], positive='tumour', size=96,
                                                      resize='pil-bilinear', mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                                                      threshold=0.5, tta=False, centre_box=True, mpp=0.972, input_mpp=0.972)))
    return dest


def make_cohort(dest:Path, data:Path, n_slides:int, side:int) -> Path:
    "n_slides mosaic slides of side x side real tiles (drawn with replacement), and their manifest"
    labels = pd.read_csv(data/'train_labels.csv')
    tiles = np.stack([np.asarray(Image.open(data/'train'/f'{i}.tif').convert('RGB')) for i in labels.id])
    rng, rows = np.random.default_rng(0), []
    for k in range(n_slides):
        pick = rng.integers(0, len(tiles), side * side)
        make_mosaic_slide(dest/f'slide{k}.tif', tiles[pick], labels.label.to_numpy()[pick], cols=side)
        rows.append(dict(slide=f'slide{k}.tif', label=int(labels.label[pick].max())))
    pd.DataFrame(rows).to_csv(dest/'cohort.csv', index=False)
    return dest/'cohort.csv'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--data', default=str(ROOT/'tests'/'data'/'real-pcam-100'), help='Kaggle-layout folder of real tiles')
    ap.add_argument('--slides', type=int, default=8, help='Slides in the cohort')
    ap.add_argument('--side', type=int, default=16, help='Tiles per side of each mosaic slide')
    ap.add_argument('--workers', default='1,2', help='Worker counts to compare, comma-separated')
    ap.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    ap.add_argument('--bs', type=int, default=64)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix='cohort-bench-') as tmp:
        tmp = Path(tmp)
        manifest, bundle = make_cohort(tmp, Path(a.data), a.slides, a.side), hand_bundle(tmp/'bundle')
        results = {}
        for n in map(int, a.workers.split(',')):
            t0 = time.perf_counter()
            table = run_cohort(manifest, bundle, tmp/f'out-{n}', workers=n, device=a.device, bs=a.bs, show_progress=False)
            wall = time.perf_counter() - t0
            tiles = int(table.tiles_classified.sum())
            results[f'{n} worker' + ('s' if n > 1 else '')] = dict(tiles=tiles, seconds=wall, tiles_per_s=tiles / wall,
                                                                   slide_seconds=float(table.seconds.sum()))
    names = list(results)
    print(f'| {a.slides} slides of {a.side}x{a.side} tiles, {a.device} | ' + ' | '.join(names) + ' |')
    print('|---|' + '---|' * len(names))
    for key, label, fmt in (('tiles', 'tiles classified', '{:.0f}'), ('seconds', 'wall seconds', '{:.1f}'),
                            ('tiles_per_s', 'tiles/s (wall)', '{:.1f}'), ('slide_seconds', 'sum of per-slide seconds', '{:.1f}')):
        print(f'| {label} | ' + ' | '.join(fmt.format(results[n][key]) for n in names) + ' |')


if __name__ == '__main__':
    main()
