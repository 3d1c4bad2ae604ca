"""The in-browser docs figure: the exported page classifying real held-out tiles in headless Chromium.

    python tools/web_figure.py [--src ../shared/real-pcam] [--work /tmp/web-figure] [--n 200]

Trains the cpu-demo recipe on the real-tile benchmark's training part (the same split rule as `bench/real_pcam.py`), exports
it as a user does (`export --web`: the run's 8-view TTA, the page beside the bundle), opens the page from file:// in headless
Chromium, chooses `n` of the held-out tiles in its file picker and reads the page's probabilities. It prints them against
`load_bundle(...).predict` on the same files, the tile AUC from the page's numbers, the page's size and the throughputs, and
writes `nbs/images/web_page.png` (a screenshot of the first rows) and `nbs/images/web_page.json` (what was measured).
About 6 minutes on 2 CPU cores."""
from __future__ import annotations
import argparse, json, shutil, sys, time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'bench'))
from real_pcam import split_folder  # noqa: E402  the benchmark's split rule, so the held-out tiles are the benchmark's

from pcam_fastai.bundling import export_bundle  # noqa: E402

from pcam_fastai.export import load_bundle
from pcam_fastai.train import train_pcam  # noqa: E402
from pcam_fastai.web import CHROMIUM, CHROMIUM_ARGS, export_web, wait_for  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--src', type=Path, default=ROOT.parent/'shared'/'real-pcam', help='Kaggle-layout folder of real tiles')
    ap.add_argument('--work', type=Path, default=Path('/tmp/web-figure'), help='scratch folder (removed at the end)')
    ap.add_argument('--n', type=int, default=200, help='held-out tiles classified in the page')
    ap.add_argument('--web-runtime', default=None, help='a folder of the runtime tarballs (npm pack); default: the cache or npm')
    ap.add_argument('--keep', action='store_true', help='keep the scratch folder (its run/bundle, e.g. for bench/web_page.py)')
    a = ap.parse_args()
    if not (a.src/'train_labels.csv').exists(): raise SystemExit(f'{a.src} is not a Kaggle-layout folder of real tiles')
    from playwright.sync_api import sync_playwright
    a.work.mkdir(parents=True, exist_ok=True)
    try:
        train_dir, held = split_folder(a.src, a.work)
        train_pcam(train_dir, run_dir=a.work/'run', cache=a.work/'cache', preset='cpu-demo', num_workers=0, force=True)
        web = export_web(export_bundle(a.work/'run', bench_patches=128), runtime=a.web_runtime)
        bundle = load_bundle(a.work/'run'/'bundle', device='cpu')
        held = held.iloc[:a.n]
        files = [a.src/'train'/f'{i}.tif' for i in held.id]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={'width': 1000, 'height': 1000})
            page.goto((web/'index.html').as_uri())
            wait_for(page, 'window.pcamState.ready || !!window.pcamState.failed')
            t0 = time.perf_counter()
            page.set_input_files('#files', [str(f) for f in files])
            wait_for(page, f'window.pcamState.done >= {len(files)}', 600)
            page_s = time.perf_counter() - t0
            got = np.array(page.evaluate("[...document.querySelectorAll('#results tbody tr')].map(tr => Number(tr.dataset.p))"))
            page.screenshot(path=str(a.work/'page.png'), clip=dict(x=0, y=0, width=1000, height=1000))
            browser.close()
        ref = bundle.predict(files)[:, 1]
        y = held.label.to_numpy()
        info = json.loads((web/'web.json').read_text())
        m = dict(tiles=len(files), max_abs_diff_page_vs_python=float(np.abs(got - ref).max()),
                 auc_page=round(float(roc_auc_score(y, got)), 4), auc_python=round(float(roc_auc_score(y, ref)), 4),
                 page_seconds_for_tiles=round(page_s, 1), page_total_mb=info['total_mb'], browser=info['browser'],
                 python_onnxruntime_patches_per_s=bundle.meta.get('onnx_patches_per_s'), python_threads=bundle.meta.get('bench_threads'),
                 tta=bundle.meta.get('tta'), arch=bundle.meta['arch'], size=bundle.size)
        print(json.dumps(m, indent=1))
        from PIL import Image
        Image.open(a.work/'page.png').convert('RGB').save(ROOT/'nbs'/'images'/'web_page.png', optimize=True)
        (ROOT/'nbs'/'images'/'web_page.json').write_text(json.dumps(m, indent=1) + '\n')
    finally:
        if not a.keep: shutil.rmtree(a.work, ignore_errors=True)


if __name__ == '__main__': main()
