"""The whole-slide docs figure: a heatmap of a test slide made of real tiles the model never saw.

    python tools/slide_figure.py [--src ../shared/real-pcam] [--work /tmp/slide-figure]

Trains the cpu-demo recipe on the real-tile benchmark's training part (the same split rule as `bench/real_pcam.py`: about one id
in five held out), exports it for one view, lays 256 of the held-out tiles out on a 16 x 16 grid with the positives in one patch
(a "metastasis"), writes it as a pyramidal TIFF, and runs `slide_heatmap` on it. It writes `nbs/images/slide_heatmap.jpg` (the
heatmap, as JPEG to stay small) and `nbs/images/slide_heatmap.json` (what was measured), and prints the tile AUC on the slide
against the same bundle's AUC on the tiles as separate patches. About 8 minutes on 2 CPU cores."""
from __future__ import annotations
import argparse, json, shutil, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'bench'))
from real_pcam import split_folder  # noqa: E402  the benchmark's split rule, so the held-out tiles are the benchmark's

from pcam_fastai.bundling import export_bundle  # noqa: E402

from pcam_fastai.export import load_bundle
from pcam_fastai.heatmap import slide_heatmap  # noqa: E402
from pcam_fastai.testslides import make_mosaic_slide  # noqa: E402
from pcam_fastai.train import train_pcam  # noqa: E402


def layout(labels:np.ndarray, side:int=16, centre=(9.5, 6.5), radius:float=4.3, seed:int=0) -> np.ndarray:
    "Indices of held-out tiles in row-by-row order on a side x side grid: positives inside a disc, negatives around it"
    rng = np.random.default_rng(seed)
    r, c = np.divmod(np.arange(side * side), side)
    inside = (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= radius ** 2
    pos, neg = rng.permutation(np.flatnonzero(labels == 1)), rng.permutation(np.flatnonzero(labels == 0))
    if inside.sum() > len(pos) or (~inside).sum() > len(neg): raise SystemExit('not enough held-out tiles for the layout')
    order = np.empty(side * side, np.int64)
    order[inside], order[~inside] = pos[:inside.sum()], neg[:(~inside).sum()]
    return order


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--src', type=Path, default=ROOT.parent/'shared'/'real-pcam', help='Kaggle-layout folder of real tiles')
    ap.add_argument('--work', type=Path, default=Path('/tmp/slide-figure'), help='scratch folder (removed at the end)')
    a = ap.parse_args()
    if not (a.src/'train_labels.csv').exists(): raise SystemExit(f'{a.src} is not a Kaggle-layout folder of real tiles')
    a.work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        train_dir, held = split_folder(a.src, a.work)
        train_pcam(train_dir, run_dir=a.work/'run', cache=a.work/'cache', preset='cpu-demo', num_workers=0, force=True)
        bundle = load_bundle(export_bundle(a.work/'run', bench_patches=0, onnx=False, tta=False), device='cpu')
        train_s = time.perf_counter() - t0
        order = layout(held.label.to_numpy())
        ids, labels = held.id.to_numpy()[order], held.label.to_numpy()[order]
        patches = np.stack([np.asarray(Image.open(a.src/'train'/f'{i}.tif').convert('RGB')) for i in ids])
        slide = make_mosaic_slide(a.work/'held-out-mosaic.tif', patches, labels, cols=16, margin_tiles=2)
        res = slide_heatmap(slide.path, bundle, a.work/'out', show_progress=False)[0]
        tiles = pd.read_csv(a.work/'out'/'held-out-mosaic'/'tiles.csv').set_index(['x', 'y'])
        p_slide = tiles.reindex([tuple(b) for b in slide.boxes[:, :2]])['probability'].to_numpy()
        p_patch = bundle.predict(patches)[:, 1]
        classified = ~np.isnan(p_slide)
        placed_mm2 = labels.sum() * (96 * 0.972 / 1000) ** 2
        out = dict(tiles=len(ids), positives=int(labels.sum()), tiles_classified=res['tiles_classified'], tiles_background=res['tiles_background'],
                   auc_slide=round(float(roc_auc_score(labels[classified], p_slide[classified])), 4),
                   auc_patches=round(float(roc_auc_score(labels, p_patch)), 4),
                   auc_patches_same_tiles=round(float(roc_auc_score(labels[classified], p_patch[classified])), 4),
                   max_abs_diff=float(np.nanmax(np.abs(p_slide - p_patch))), tumour_area_mm2=round(res['tumour_area_mm2'], 3),
                   placed_positive_area_mm2=round(placed_mm2, 3), threshold=round(res['threshold'], 4), threshold_source=res['threshold_source'],
                   train_seconds=round(train_s, 1), heatmap_seconds=res['seconds']['total'],
                   how='python tools/slide_figure.py: cpu-demo on the real-tile benchmark training part, 256 of its held-out tiles on the slide')
        dest = ROOT/'nbs'/'images'
        dest.mkdir(exist_ok=True)
        Image.open(a.work/'out'/'held-out-mosaic'/'heatmap.png').convert('RGB').save(dest/'slide_heatmap.jpg', quality=85)
        (dest/'slide_heatmap.json').write_text(json.dumps(out, indent=2) + '\n')
        print(json.dumps(out, indent=2))
        print(f"figure: {dest/'slide_heatmap.jpg'} ({(dest/'slide_heatmap.jpg').stat().st_size / 1e3:.0f} kB)")
    finally: shutil.rmtree(a.work, ignore_errors=True)


if __name__ == '__main__': main()
