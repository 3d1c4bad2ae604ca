"Run folders and bundles written by earlier versions (tests/data/old_runs) still open, through `pcam_fastai.runs` only."
import json, shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OLD = ROOT/'tests'/'data'/'old_runs'
FIXTURES = sorted(p for p in OLD.iterdir() if p.is_dir())
FILE_NAMES = ('config.json', 'metrics.json', 'bundle.json')


def test_there_are_fixtures():
    assert {p.name for p in FIXTURES} >= {'v0.1-2026-12-03', 'format1-early'}


@pytest.mark.parametrize('old', FIXTURES, ids=lambda p: p.name)
def test_old_files_read_and_round_trip(old):
    "Every field written is kept (typed or in `extra`), and the typed fields have what older files lacked"
    from pcam_fastai.runs import read_config, read_metrics, read_bundle_meta, RunConfig, RunMetrics, BundleMeta
    cfg, m, b = read_config(old), read_metrics(old), read_bundle_meta(old/'bundle')
    for rec, fn in ((cfg, old/'config.json'), (m, old/'metrics.json'), (b, old/'bundle'/'bundle.json')):
        raw = json.loads(fn.read_text())
        assert {k: v for k, v in rec.to_dict().items() if k in raw} == raw
        assert type(rec).from_dict(rec.to_dict()) == rec
    assert (cfg.arch, cfg.size) == ('regnetx_002', 48)
    assert isinstance(cfg, RunConfig) and isinstance(m, RunMetrics) and isinstance(b, BundleMeta)
    assert m.threshold is not None and 0 < m.threshold < 1 and m.temperature > 0
    assert b.resize == 'pil-bilinear' and b.centre_box is True and b.size == 48


def test_early_run_gets_what_it_lacked():
    from pcam_fastai.runs import read_config, read_metrics, read_bundle_meta, OLD_YOUDEN
    old = OLD/'format1-early'
    cfg, m, b = read_config(old), read_metrics(old), read_bundle_meta(old/'bundle')
    assert (cfg.format, cfg.classes, cfg.input_stats, cfg.stain_norm, cfg.tta) == (1, None, None, None, False)
    assert (m.temperature, m.bias, m.threshold, m.threshold_record['source'], m.model_sha256) == (1.0, None, 0.4375, OLD_YOUDEN, None)
    assert (b.format, b.input_mpp, b.sha256, b.tta) == (1, None, None, False)


@pytest.fixture(scope='module')
def fresh_weights(tmp_path_factory):
    "Fresh weights of the fixtures' network (regnetx_002, two classes): the fixtures keep no weights"
    import torch
    from pcam_fastai.export import build_model
    d = tmp_path_factory.mktemp('weights')
    torch.manual_seed(0)
    torch.save(build_model('regnetx_002', 2).state_dict(), d/'model.pth')
    return d/'model.pth'


@pytest.mark.parametrize('name', ['v0.1-2026-12-03', 'format1-early'])
def test_old_run_reopens_and_exports(name, fresh_weights, small_set, tmp_path):
    "An old run folder (with fresh weights of its network) reopens as a learner and exports a bundle that loads"
    import numpy as np
    from pcam_fastai.core import file_sha256
    from pcam_fastai.runs import load_run, read_metrics, write_metrics
    from pcam_fastai.bundling import export_bundle
    from pcam_fastai.export import load_bundle
    run = tmp_path/'run'
    shutil.copytree(OLD/name, run, ignore=shutil.ignore_patterns('bundle'))
    shutil.copy(fresh_weights, run/'model.pth')
    m = read_metrics(run)
    if m.model_sha256: m.model_sha256 = file_sha256(run/'model.pth'); write_metrics(run, m)  # the fixture's own weights are not kept
    learn = load_run(run, data=small_set, cpu=True)
    assert learn.threshold == m.threshold and learn.temperature == m.temperature
    bundle = export_bundle(run, onnx=False, bench_patches=0, check_images=[])
    b = load_bundle(bundle, backend='torch', device='cpu')
    assert b.threshold == m.threshold and b.size == 48
    p = b.predict(np.zeros((2, 48, 48, 3), np.uint8))
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize('name', ['v0.1-2026-12-03', 'format1-early'])
def test_old_bundle_loads(name, fresh_weights, tmp_path):
    "An old bundle (with fresh weights of its network) loads and predicts; its missing fields take their old meaning"
    import numpy as np
    from pcam_fastai.export import load_bundle
    b = tmp_path/'bundle'
    shutil.copytree(OLD/name/'bundle', b)
    shutil.copy(fresh_weights, b/'weights.pth')
    meta = json.loads((b/'bundle.json').read_text())
    meta.pop('sha256', None)  # the fixture's checksums are of weights not kept
    (b/'bundle.json').write_text(json.dumps(meta))
    bundle = load_bundle(b, backend='torch', device='cpu')
    assert bundle.centre_box is True and bundle.meta['resize'] == 'pil-bilinear'
    assert bundle.predict(np.zeros((1, 48, 48, 3), np.uint8)).shape == (1, 2)


def test_file_names_are_named_in_runs_only():
    "config.json, metrics.json and bundle.json appear in pcam_fastai/runs.py only: every other module goes through it"
    named = []
    for f in sorted((ROOT/'pcam_fastai').glob('*.py')):
        if f.name in ('runs.py', '_modidx.py'): continue
        named += [f'{f.name}:{i}' for i, line in enumerate(f.read_text().splitlines(), 1) if any(n in line for n in FILE_NAMES)]
    assert not named, named

