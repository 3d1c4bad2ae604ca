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
    from pcam_fastai.bundling import export_bundle
    from pcam_fastai.export import load_bundle
    from pcam_fastai.evaluate import predict
    from pcam_fastai.runs import load_run
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
    from pcam_fastai.runs import load_run
    from pcam_fastai.uploads import classify
    res = run_main(['cache', FIXTURE, tmp_path/'c', '--stain-norm', 'macenko'])
    assert res.returncode == 0, res.stdout + res.stderr
    normed = list((tmp_path/'c').glob('stain-macenko-*'))
    assert len(normed) == 1 and 'Train on it with' in res.stdout
    res = run_main(['train', '--data', tmp_path/'c', '--run-dir', tmp_path/'run', '--stain-norm', 'macenko', '--epochs-unfrozen', '1', '--size', '48',
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
    from pcam_fastai.stain import StainNormalizer, choose_reference
    from pcam_fastai.stain_cache import normalize_cache
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


def bad_references():
    "Stain references that would normalize every patch wrongly: grayscale tissue, one flat colour, 2x2 px"
    gray, tile = odd_patches()[2:]
    return dict(grayscale=(gray, 'it looks grayscale'), single_colour=(np.full((96, 96, 3), (180, 90, 160), np.uint8), 'is a flat colour'),
                tiny=(tile[40:42, 40:42], 'is 2x2 px, too small'))


@pytest.mark.parametrize('method', ['macenko', 'reinhard'])
@pytest.mark.parametrize('kind', ['grayscale', 'single_colour', 'tiny'])
def test_a_bad_stain_reference_is_refused_when_fitted(method, kind):
    "A grayscale, single-colour or tiny reference is a StainError at fit, not a gray, flattened or crashed cache later"
    from pcam_fastai.stain import StainNormalizer, StainError
    ref, message = bad_references()[kind]
    with pytest.raises(StainError, match=message): StainNormalizer(method).fit(ref)


def test_every_real_tile_with_tissue_is_a_valid_reference():
    "The reference checks pass every fixture tile with at least 10 % tissue, alone, with either method; Macenko wants 500 stained pixels"
    from PIL import Image
    from pcam_fastai.stain import StainNormalizer, StainError, tissue_fraction
    tiles = [t for t in (np.asarray(Image.open(f).convert('RGB')) for f in sorted((FIXTURE/'train').glob('*.tif'))) if tissue_fraction(t) >= 0.1]
    assert len(tiles) >= 90
    for method in ('macenko', 'reinhard'):
        for t in tiles: StainNormalizer(method).fit(t)
    sparse = odd_patches()[-1][:32, :32].copy(); sparse[:20] = 250  # 32x32 px, under 400 stained pixels
    with pytest.raises(StainError, match=r"holds 3\d\d stained pixels, too few for Macenko"): StainNormalizer('macenko').fit(sparse)
    StainNormalizer('reinhard').fit(sparse)


@pytest.mark.parametrize('error', ['numpy', 'torch'])
def test_a_failed_reference_estimate_is_a_stain_error(error):
    "A LinAlgError inside the library's fit (numpy's or torch's) becomes a StainError naming it; so it does on a patch"
    from pcam_fastai.stain import StainNormalizer, StainError
    tile = odd_patches()[-1]
    def fail(*a, **k): raise (np.linalg.LinAlgError if error == 'numpy' else torch.linalg.LinAlgError)('SVD did not converge')
    n = StainNormalizer('macenko', on_bad='raise')
    n.impl.lib.fit = fail
    with pytest.raises(StainError, match=r'estimate failed on the stain reference \(LinAlgError: SVD did not converge\)'): n.fit(tile)
    assert not n.fitted
    n = StainNormalizer('macenko', on_bad='raise').fit(tile)
    n.impl.lib.normalize = fail
    with pytest.raises(StainError, match=r'tile cannot be stain-normalized: the macenko estimate failed \(LinAlgError'): n.normalize(tile, 'tile')


def test_cli_cache_refuses_a_grayscale_reference(tmp_path):
    "`cache --stain-norm --stain-ref GRAY.png` stops with one line saying what is wrong instead of writing a gray normalized cache"
    from PIL import Image
    from conftest import clean_error
    Image.fromarray(bad_references()['grayscale'][0]).save(tmp_path/'gray.png')
    err = clean_error(run_main(['cache', FIXTURE, tmp_path/'c', '--stain-norm', 'reinhard', '--stain-ref', tmp_path/'gray.png']))
    assert 'it looks grayscale' in err and 'pass colour H&E patches' in err
    assert not list((tmp_path/'c').glob('stain-*'))


def test_a_registered_stain_method_is_accepted_everywhere(tmp_path):
    "A toy method in a few lines: StainNormalizer uses it and stores its numbers; train_pcam and `cache` accept its name; unregistered, all refuse it"
    from pcam_fastai import cli
    from pcam_fastai.core import PCamError, UsageError
    from pcam_fastai.stain import METHODS, StainError, StainMethod, StainNormalizer, register_stain_method, unregister_stain_method
    from pcam_fastai.train import train_pcam

    @register_stain_method
    class MeanRGB(StainMethod):
        "Scale each RGB channel so that the patch's mean colour is the reference's"
        name, numbers = 'mean-rgb', dict(rgb_means=(3,))
        def fit(self, ref): self.rgb_means = ref.float().mean((1, 2))
        def normalize(self, t): return t.float() * (self.rgb_means / t.float().mean((1, 2)).clamp_min(1))[:, None, None]

    ref = odd_patches()[-1]
    tile = np.ascontiguousarray(ref[::-1, :, ::-1])  # another staining: the channels swapped
    try:
        assert list(METHODS) == ['macenko', 'reinhard', 'mean-rgb']
        n = StainNormalizer('mean-rgb').fit(ref)
        out = n.normalize(tile)
        assert out.dtype == np.uint8 and out.shape == tile.shape
        np.testing.assert_allclose(out.reshape(-1, 3).mean(0), ref.reshape(-1, 3).mean(0), atol=3)  # the reference's mean colour
        assert n.normalize(np.full((96, 96, 3), 255, np.uint8)) is None  # background is left as it is, as with every method
        d = json.loads(json.dumps(n.to_dict()))
        assert d['method'] == 'mean-rgb' and np.allclose(d['rgb_means'], ref.reshape(-1, 3).mean(0), atol=1e-3)
        again = StainNormalizer.from_dict(d)
        assert again.to_dict() == n.to_dict() and (again.normalize(tile) == out).all()
        # the name passes train_pcam's and the command's checks: what fails is the next setting, or the missing data
        with pytest.raises(UsageError, match='stain_norm_at must be'):
            train_pcam(tmp_path/'none', run_dir=tmp_path/'r', stain_norm='mean-rgb', stain_norm_at='gpu')
        with pytest.raises(PCamError, match='does not exist') as e: cli.cache(tmp_path/'none', tmp_path/'c', stain_norm='mean-rgb')
        assert 'Unknown' not in str(e.value)
    finally:
        assert unregister_stain_method('mean-rgb') is MeanRGB
    assert list(METHODS) == ['macenko', 'reinhard']  # other tests see the package's methods only
    with pytest.raises(UsageError, match="Unknown stain normalization 'mean-rgb'; choose one of \\['macenko', 'reinhard'\\]"):
        StainNormalizer('mean-rgb')
    with pytest.raises(UsageError, match="Unknown stain normalization 'mean-rgb'"):
        train_pcam(tmp_path/'none', run_dir=tmp_path/'r', stain_norm='mean-rgb')
    with pytest.raises(UsageError, match="Unknown --stain-norm 'mean-rgb'; choose macenko, reinhard or none."):
        cli.cache(tmp_path/'none', tmp_path/'c', stain_norm='mean-rgb')
    with pytest.raises(StainError, match='incomplete or damaged'): StainNormalizer.from_dict(d)  # a stored toy is refused too
