"Stain normalization as a run setting, on the committed real tiles: the bundle and the server normalize exactly as training did, in both places it can happen."
import io, json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_main

FIXTURE = Path(__file__).parent/'data'/'real-pcam-100'


@pytest.fixture(scope='module')
def raw_cache(tmp_path_factory):
    from pcam_fastai.cache import build_cache
    return build_cache(FIXTURE, tmp_path_factory.mktemp('stain')/'cache', show_progress=False)


def odd_patches():
    "A blank white patch, a single-colour patch, a grayscale tissue patch and a real one"
    from PIL import Image
    from pcam_fastai.stain import choose_reference
    tile = choose_reference([np.asarray(Image.open(f).convert('RGB')) for f in sorted((FIXTURE/'train').glob('*.tif'))[:10]], k=1)[0]
    gray = np.repeat(np.asarray(Image.fromarray(tile).convert('L'))[..., None], 3, 2)
    return np.stack([np.full((96, 96, 3), 255, np.uint8), np.full((96, 96, 3), (180, 90, 160), np.uint8), gray, tile])


def check_bundle_predicts_like_learner(run_dir, learn, raw_cache, at, onnx=True, method='macenko'):
    "The run's bundle, fed raw patches, predicts what the learner predicts; so does the run reloaded"
    from pcam_fastai.cache import load_cache
    from pcam_fastai.export import export_bundle, load_bundle
    from pcam_fastai.evaluate import predict, load_run
    cfg = json.loads((run_dir/'config.json').read_text())
    assert (cfg['stain_norm']['method'], cfg['stain_norm_at']) == (method, at)
    assert (cfg['data'] != str(raw_cache.resolve())) == (at == 'cache')  # cache: trained on the normalized copy
    raw = np.concatenate([np.asarray(load_cache(raw_cache).images[:30]), odd_patches()])
    ref = predict(learn, learn.dls.test_dl(raw))[0].numpy()
    assert np.isfinite(ref).all()
    b = load_bundle(export_bundle(run_dir, bench_patches=0, onnx=onnx))
    assert b.meta['stain_norm'] == cfg['stain_norm'] and b.meta['format'] == 2
    assert np.abs(b.predict(raw) - ref).max() <= 1e-4
    assert np.abs(load_bundle(b.path, backend='torch').predict(raw) - ref).max() <= 1e-4
    b.stain_normalizer = None  # the check can fail: without the run's normalization the predictions move
    assert np.abs(b.predict(raw) - ref).max() > 1e-3
    for data in (None, raw_cache):  # the run reloaded, on its own data or on the raw cache, normalizes the same way
        again = load_run(run_dir, data=data, cpu=True)
        assert np.abs(predict(again, again.dls.test_dl(raw))[0].numpy() - ref).max() <= 1e-5
    return load_bundle(b.path)


@pytest.mark.slow
def test_cli_cache_train_export_serve_normalize_alike(raw_cache, tmp_path):
    "`cache --stain-norm macenko` writes the normalized copy that `train --stain-norm macenko` reuses; its bundle and the server normalize raw tiles as training did"
    from PIL import Image
    from pcam_fastai.evaluate import load_run
    from pcam_fastai.serve import classify
    res = run_main(['cache', FIXTURE, tmp_path/'c', '--stain-norm', 'macenko'])
    assert res.returncode == 0, res.stdout + res.stderr
    normed = list((tmp_path/'c').glob('stain-macenko-*'))
    assert len(normed) == 1 and 'Train on it with' in res.stdout
    res = run_main(['train', '--data', tmp_path/'c', '--run-dir', tmp_path/'run', '--stain-norm', 'macenko', '--epochs-unfrozen', '1',
                    '--lr-find-iters', '5', '--num-workers', '0'])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert list((tmp_path/'c').glob('stain-macenko-*')) == normed  # reused, not normalized again
    assert json.loads((tmp_path/'run'/'config.json').read_text())['data'] == str(normed[0].resolve())
    assert 'Stain handling: Macenko normalization (once, into a normalized cache)' in (tmp_path/'run'/'report.md').read_text()
    b = check_bundle_predicts_like_learner(tmp_path/'run', load_run(tmp_path/'run', cpu=True), tmp_path/'c', 'cache')
    from fastai.learner import load_learner
    assert load_learner(tmp_path/'run'/'learner.pkl', cpu=True).dls.stain_norm_at == 'cache'  # our own file: the exported learner still normalizes raw patches
    tile = odd_patches()[-1]
    buf = io.BytesIO(); Image.fromarray(tile).save(buf, format='PNG')
    got = classify(b, [('tile.png', buf.getvalue())], with_gradcam=False)['results'][0]['probabilities']
    np.testing.assert_allclose(list(got.values()), b.predict(tile[None])[0], atol=2e-6)
    b.stain_normalizer = None
    assert np.abs(np.array(list(got.values())) - b.predict(tile[None])[0]).max() > 1e-5  # the upload was normalized


@pytest.mark.slow
def test_batch_normalized_run_bundle_predicts_like_the_learner(tmp_path):
    "A run normalizing every batch with Reinhard (nothing written): its bundle predicts what the learner predicts"
    from pcam_fastai.cache import build_cache
    from pcam_fastai.train import train_pcam
    raw_cache = build_cache(FIXTURE, tmp_path/'cache', show_progress=False)
    learn, _ = train_pcam(raw_cache, run_dir=tmp_path/'run', preset='cpu-demo', epochs_unfrozen=1, lr_find_iters=5, num_workers=0,
                          stain_norm='reinhard', stain_norm_at='batch')
    assert not list(raw_cache.glob('stain-*'))
    check_bundle_predicts_like_learner(tmp_path/'run', learn, raw_cache, 'batch', onnx=False, method='reinhard')  # ONNX: in the test above


def test_stain_norm_bad_input(tmp_path):
    "Wrong settings fail before any work, with what to do; a model never reads a cache normalized otherwise than it was trained"
    from pcam_fastai.cache import build_cache
    from pcam_fastai.loader import cache_dataloaders
    from pcam_fastai.core import UsageError
    raw_cache = build_cache(FIXTURE, tmp_path/'cache', show_progress=False)
    from pcam_fastai.train import train_pcam
    from pcam_fastai.stain import StainNormalizer, normalize_cache, choose_reference
    from pcam_fastai.cache import load_cache
    with pytest.raises(UsageError, match="Unknown stain normalization 'vahadane'"): train_pcam(raw_cache, run_dir=tmp_path/'r', stain_norm='vahadane')
    with pytest.raises(UsageError, match="stain_norm_at must be"): train_pcam(raw_cache, run_dir=tmp_path/'r', stain_norm='macenko', stain_norm_at='gpu')
    with pytest.raises(UsageError, match='array caches'): train_pcam(FIXTURE, run_dir=tmp_path/'r', stain_norm='macenko')
    normed = normalize_cache(raw_cache, StainNormalizer('macenko').fit(choose_reference(np.asarray(load_cache(raw_cache).images[:20]))), show_progress=False)
    with pytest.raises(UsageError, match='already stain-normalized'): train_pcam(normed, run_dir=tmp_path/'r', stain_norm='macenko')
    with pytest.raises(UsageError, match='does not exist'): train_pcam(raw_cache, run_dir=tmp_path/'r', stain_norm='macenko', stain_ref=tmp_path/'no.png')
    with pytest.raises(UsageError, match='holds a cache of raw patches'): normalize_cache(raw_cache, StainNormalizer('macenko').fit(choose_reference(np.asarray(load_cache(raw_cache).images[:20]))), dest=raw_cache)
    with pytest.raises(UsageError, match='trained on raw ones'): cache_dataloaders(raw_cache, device='cpu').check_stain(normed)
    with pytest.raises(UsageError, match='holds raw patches'): cache_dataloaders(normed, device='cpu').check_stain(raw_cache)
    res = run_main(['cache', FIXTURE, tmp_path/'c', '--stain-norm', 'staintools'])
    assert res.returncode != 0 and 'Unknown --stain-norm' in res.stdout + res.stderr and not (tmp_path/'c').exists()


def test_odd_patches_through_the_normalizing_pipeline(raw_cache):
    "White, single-colour and grayscale patches pass the normalizing batch pipeline without NaN"
    from pcam_fastai.loader import cache_dataloaders
    from pcam_fastai.stain import StainNormalizer, choose_reference
    from pcam_fastai.cache import load_cache
    mac = StainNormalizer('macenko').fit(choose_reference(np.asarray(load_cache(raw_cache).images[:20])))
    dls = cache_dataloaders(raw_cache, size=96, bs=8, device='cpu', stain_norm=mac)
    odd = odd_patches()
    xb = dls.test_dl(odd).one_batch()[0]
    assert torch.isfinite(xb).all()
    t = torch.from_numpy(odd).permute(0, 3, 1, 2)
    assert [mac.normalize_tensor(p) is None for p in t] == [True, True, False, False]  # background and one colour are left as they are
