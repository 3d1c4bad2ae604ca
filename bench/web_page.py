"""In-browser throughput of an exported bundle's page, side by side with onnxruntime in Python on the same machine.

    python bench/web_page.py BUNDLE [--web-runtime DIR] [--n 128]

Writes BUNDLE/web/ (as `pcam-fastai web`), then times the same model.onnx on random patches:
- in headless Chromium: the page's own runtime (onnxruntime-web, WebAssembly, one thread, in its web worker), batch 1 and 16;
- in Python: onnxruntime on the CPU with one thread (the browser's budget) and with all threads, batch 1 and 16.
The patches are random: speed does not depend on what the pixels show. Needs playwright and a Chromium (apt-get install chromium).
"""
import argparse, json, os, sys, time
from pathlib import Path

import numpy as np


def onnx_rate(model:Path, size:int, bs:int, threads:int, n:int) -> float:
    "Patches/s of onnxruntime in this process on random uint8 patches"
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), so, providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).integers(0, 256, (bs, size, size, 3), dtype=np.uint8)
    sess.run(None, {'patches': x})  # warm-up
    done, t0 = 0, time.perf_counter()
    while done < n and (done == 0 or time.perf_counter() - t0 < 20): sess.run(None, {'patches': x}); done += bs
    return done / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('bundle', type=Path, help='a bundle folder written by pcam-fastai export (with model.onnx)')
    ap.add_argument('--web-runtime', default=None, help='a folder of the runtime tarballs (npm pack); default: the cache or npm')
    ap.add_argument('--n', type=int, default=128, help='patches timed per figure (at most ~20 s each)')
    ap.add_argument('--out', type=Path, default=None, help='also write the figures as JSON')
    a = ap.parse_args()
    from pcam_fastai.web import export_web, measure_page
    web = export_web(a.bundle, runtime=a.web_runtime, measure=False)
    meta = json.loads((a.bundle/'bundle.json').read_text())
    size, cores = int(meta['size']), os.cpu_count()
    rows = []
    for bs in (1, 16):
        b = measure_page(web, n=a.n, bs=bs)
        if 'not_measured' in b: sys.exit(f'the page could not be timed: {b["not_measured"]}')
        rows.append((f"Chromium {b['browser'].split()[1]}, onnxruntime-web (wasm, 1 thread, worker)", bs, b['patches_per_s']))
        rows.append(('Python onnxruntime, CPU, 1 thread', bs, round(onnx_rate(a.bundle/'model.onnx', size, bs, 1, a.n), 1)))
        rows.append((f'Python onnxruntime, CPU, {cores} threads', bs, round(onnx_rate(a.bundle/'model.onnx', size, bs, cores, a.n), 1)))
    print(f"\n{meta['arch']} at {size} px, {'8-view TTA' if meta.get('tta') else 'one view'}, page {json.loads((web/'web.json').read_text())['total_mb']} MB\n")
    print(f"| {'runtime':66} | batch | patches/s |\n|{'-' * 68}|-------|-----------|")
    for name, bs, r in rows: print(f'| {name:66} | {bs:5} | {r:9} |')
    base = {bs: r for name, bs, r in rows if name == 'Python onnxruntime, CPU, 1 thread'}
    print('\nthe page against onnxruntime in Python on one thread: '
          + ', '.join(f'batch {bs}: {r / base[bs]:.2f}x' for name, bs, r in rows if name.startswith('Chromium')))
    if a.out: a.out.write_text(json.dumps([dict(runtime=n, batch=bs, patches_per_s=r) for n, bs, r in rows], indent=1) + '\n')


if __name__ == '__main__': main()
