"`pcam-fastai export` on the README's demo run: ONNX agrees with torch in onnxruntime, the bundle predicts like the learner, and it serves in a real browser."
import json

import numpy as np
import pytest
import torch

from conftest import run_cli, run_main, clean_error, launch_chromium

pytestmark = pytest.mark.slow  # trains models, starts processes or builds pages: the fast loop skips these



@pytest.fixture(scope='module')
def bundle(demo_run, tmp_path_factory):
    run_dir, data, _ = demo_run
    dest = tmp_path_factory.mktemp('bundle')/'bundle'
    res = run_cli(['export', '--run-dir', run_dir, '--dest', dest, '--bench-patches', '128'])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert 'patches/s' in res.stdout
    return dest, run_dir, data


def test_bundle_files_and_report(bundle):
    dest, run_dir, _ = bundle
    for f in ('weights.pth', 'model.onnx', 'bundle.json', 'report.md'): assert (dest/f).exists(), f
    meta = json.loads((dest/'bundle.json').read_text())
    assert meta['classes'] == ['normal', 'tumour'] and meta['positive'] == 'tumour' and meta['size'] == 96
    assert meta['onnx_max_abs_diff'] <= 1e-4 and meta['onnx_checked_on'] >= 16
    assert meta['torch_patches_per_s'] > 0 and meta['onnx_patches_per_s'] > 0 and meta['bench_batch'] == 64
    report = (dest/'report.md').read_text()
    assert 'patches/s' in report and 'MB' in report and 'parameters' in report
    print(f"\nexport: {meta['n_params']/1e6:.1f} M params, weights {meta['weights_mb']} MB, ONNX {meta['onnx_mb']} MB, "
          f"max diff {meta['onnx_max_abs_diff']:.1e}, torch {meta['torch_patches_per_s']} / onnxruntime {meta['onnx_patches_per_s']} patches/s")


def test_onnx_matches_torch_in_onnxruntime(bundle):
    "onnxruntime on model.onnx alone (numpy + PIL preprocessing as in the report) vs the run's torch model via fastai"
    import onnxruntime as ort
    from PIL import Image
    from pcam_fastai.runs import load_run
    from pcam_fastai.evaluate import predict
    dest, run_dir, data = bundle
    files = sorted((data/'train').glob('*.tif'))[:64]
    x = np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files])
    onnx_probs = ort.InferenceSession(str(dest/'model.onnx'), providers=['CPUExecutionProvider']).run(None, {'patches': x})[0]
    learn = load_run(run_dir)
    torch_probs = predict(learn, learn.dls.test_dl(files))[0].numpy()
    assert onnx_probs.shape == (64, 2)
    assert np.abs(onnx_probs - torch_probs).max() <= 1e-4, np.abs(onnx_probs - torch_probs).max()
    x_any = np.random.default_rng(0).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)  # a batch size never exported
    from pcam_fastai.export import load_bundle
    ref = load_bundle(dest, backend='torch').predict(x_any)
    got = ort.InferenceSession(str(dest/'model.onnx')).run(None, {'patches': x_any})[0]
    assert np.abs(got - ref).max() <= 1e-4


def test_bundle_device_choice(bundle, monkeypatch):
    "Where a bundle runs: the CPU here; on a GPU without onnxruntime-gpu, auto picks torch and onnx-by-name stays on the CPU (the device mocked: no GPU here)"
    from pcam_fastai import export
    from pcam_fastai.core import UsageError
    dest = bundle[0]
    b = export.load_bundle(dest, device='cpu')
    assert (b.backend, str(b.device)) == ('onnx', 'cpu') and "device='cpu'" in repr(b)
    x = np.random.default_rng(1).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    assert np.abs(b.predict(x) - export.load_bundle(dest, backend='torch', device='cpu').predict(x)).max() <= 1e-4
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match='torch sees no CUDA GPU here'): export.load_bundle(dest, device='cuda')
    monkeypatch.setattr(export, 'bundle_device', lambda d: torch.device('cuda') if d in ('auto', 'cuda') else torch.device(d))
    monkeypatch.setattr(export, '_onnx_devices', lambda: {'cpu'})  # the plain onnxruntime wheel
    assert export.load_bundle(dest).backend == 'torch'  # the GPU, through torch
    b = export.load_bundle(dest, backend='onnx')
    assert (b.backend, str(b.device)) == ('onnx', 'cpu')
    with pytest.raises(UsageError, match='pip install onnxruntime-gpu'): export.load_bundle(dest, backend='onnx', device='cuda')
    monkeypatch.setattr(export, '_onnx_devices', lambda: {'cpu', 'cuda'})  # onnxruntime-gpu
    assert export.load_bundle(dest).backend == 'onnx'
    monkeypatch.setattr(export, '_onnx_devices', lambda: set())  # no onnxruntime
    with pytest.raises(UsageError, match='needs onnxruntime'): export.load_bundle(dest, backend='onnx')


def test_export_without_tta(bundle, tmp_path):
    "tta=False: one view, 8x less work; bundle.json and the report say the run's numbers were measured with TTA"
    from pcam_fastai.bundling import export_bundle
    from pcam_fastai.export import load_bundle
    _, run_dir, data = bundle
    if not json.loads((run_dir/'config.json').read_text())['settings'].get('tta'): pytest.skip('the demo run does not use TTA')
    dest = export_bundle(run_dir, tmp_path/'one-view', bench_patches=0, onnx=False, tta=False)
    meta = json.loads((dest/'bundle.json').read_text())
    assert meta['tta'] is False and meta['valid_tta'] is True
    assert 'from one view; the run was evaluated' in (dest/'report.md').read_text()
    x = np.random.default_rng(2).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    b = load_bundle(dest, device='cpu')
    pc = b.torch_model
    with torch.no_grad(): one_view = torch.softmax(pc.model(pc.normalize(torch.from_numpy(x))) / pc.temperature + pc.bias, 1).numpy()
    p = b.predict(x)
    assert np.abs(p - one_view).max() <= 1e-6
    ref = load_bundle(bundle[0], backend='torch', device='cpu').predict(x)  # with TTA: other numbers (compared as logs: random pixels saturate)
    assert np.abs(np.log(p) - np.log(ref)).max() > 1e-3


def test_export_errors(tmp_path):
    err = clean_error(run_main(['export', '--run-dir', tmp_path/'nothing']))
    assert 'has no config.json' in err
    err = clean_error(run_main(['serve', str(tmp_path)]))
    assert 'no bundle.json' in err


def test_damaged_bundles_are_refused(bundle, tmp_path):
    "A bundle's files are checked against the SHA-256s in bundle.json, its fields against their types and ranges, and its outputs for shape and NaN"
    import shutil
    from pcam_fastai.export import BundleError, load_bundle
    from pcam_fastai.testslides import make_mosaic_slide
    src = bundle[0]
    meta = json.loads((src/'bundle.json').read_text())
    assert set(meta['sha256']) == {'weights.pth', 'model.onnx'} and meta['input_mpp'] == meta['mpp'] == 0.972  # the demo trains at 96 px
    x = np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    def copy(name, **fields):
        d = shutil.copytree(src, tmp_path/name)
        (d/'bundle.json').write_text(json.dumps(dict(meta, **fields)))
        return d
    swapped = copy('swapped')
    with open(swapped/'model.onnx', 'ab') as f: f.write(b'\0')
    with pytest.raises(BundleError, match='model.onnx is not the file this bundle was exported with'): load_bundle(swapped, backend='onnx').predict(x)
    (swapped/'weights.pth').write_bytes((swapped/'weights.pth').read_bytes()[:-10])
    with pytest.raises(BundleError, match='weights.pth is not the file'): load_bundle(swapped, backend='torch').predict(x)
    with pytest.raises(BundleError, match="was exported for .*but bundle.json says classes \\['tumour', 'normal'\\]"):
        load_bundle(copy('swapped-classes', classes=['tumour', 'normal']), backend='onnx').predict(x)
    garbage = copy('garbage', sha256=None)  # an older bundle: no hashes to check, so onnxruntime is the judge
    (garbage/'model.onnx').write_bytes(b'not a model')
    with pytest.raises(BundleError, match='is not a model onnxruntime can load'): load_bundle(garbage, backend='onnx').predict(x)
    b = load_bundle(src, backend='onnx')
    class Session:
        def __init__(self, out): self.out = out
        def run(self, names, feed): return [self.out(len(feed['patches']))]
    b._ort = Session(lambda n: np.full((n, 2), np.nan, np.float32))
    with pytest.raises(BundleError, match=r'non-finite probabilities \(NaN or inf\) for 4 of 4 patches'): b.predict(x)
    b._ort = Session(lambda n: np.full((n, 3), 1 / 3, np.float32))
    with pytest.raises(BundleError, match=r'outputs of shape \(4, 3\) for 4 patches and 2 classes'): b.predict(x)
    # on the command line: one line per bad field, no traceback; slide with a bundle lacking weights.pth says it uses the ONNX model
    slide = make_mosaic_slide(tmp_path/'m.tif', x, [0, 1, 0, 1], cols=2).path
    err = clean_error(run_main(['slide', slide, '--bundle', copy('odd', threshold='0.5', temperature='hot', size='96px'), '--out', tmp_path/'o']))
    assert "'size' must be" in err and "'threshold' must be a probability" in err and "'temperature' must be a number above 0" in err
    onnx_only = copy('onnx-only'); (onnx_only/'weights.pth').unlink()
    res = run_main(['slide', slide, '--bundle', onnx_only, '--out', tmp_path/'o', '--min-tissue', '0'])
    assert res.returncode == 0 and 'has no weights.pth; its model.onnx classifies the tiles' in res.stdout, res.stderr[-2000:]


def test_real_bundle_in_browser(bundle, tmp_path):
    "The exported model behind `serve_app`, driven by headless Chromium: a tumour patch comes back with p(tumour) and a heatmap"
    from playwright.sync_api import sync_playwright
    from pcam_fastai.serve import serve_app, serve_in_thread
    from pcam_fastai.data import read_labels
    dest, _, data = bundle
    labels = read_labels(data)
    tumour = data/'train'/f"{labels[labels.label == 1].id.iloc[0]}.tif"
    with serve_in_thread(serve_app(dest)) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(); page.set_default_timeout(30_000)
            page.goto(url + '/')
            page.set_input_files('input[type=file]', str(tumour))
            page.click('button[type=submit]')
            page.wait_for_selector('.result')
            prob = page.locator('.result .prob').inner_text()
            assert prob.startswith('p(tumour) = '), prob
            assert page.locator('.result img.overlay').evaluate('e => [e.complete, e.naturalWidth]') == [True, 96]
        finally: browser.close()


def test_bundle_reproduces_cache_training_at_another_size(tmp_path):
    "A run trained from the array cache at 64 px (torch resize on the batch): the exported ONNX model, fed raw 96 px patches, predicts what the learner predicts"
    from pcam_fastai.data import make_synthetic_pcam
    from pcam_fastai.cache import build_cache
    from pcam_fastai.train import train_pcam
    from pcam_fastai.bundling import export_bundle
    from pcam_fastai.export import load_bundle
    from pcam_fastai.evaluate import predict
    cache = build_cache(make_synthetic_pcam(tmp_path/'pcam', n_train=96, n_test=4, seed=2), tmp_path/'cache')
    learn, _ = train_pcam(cache, run_dir=tmp_path/'run', preset='cpu-demo', size=64, epochs_frozen=1, epochs_unfrozen=1, lr_find_iters=10)
    b = load_bundle(export_bundle(tmp_path/'run', bench_patches=0))
    assert (b.backend, b.meta['resize']) == ('onnx', 'torch-bilinear')
    vdl = learn.dls.valid.new(shuffle=False, drop_last=False)
    ref = predict(learn, vdl)[0].numpy()
    raw = vdl.dataset.batch(np.arange(len(vdl.dataset)))[0].as_subclass(torch.Tensor)  # the uint8 patches the loader read, in its order
    got = b.predict(np.ascontiguousarray(raw.permute(0, 2, 3, 1).numpy()))
    assert np.abs(got - ref).max() <= 1e-4, np.abs(got - ref).max()
