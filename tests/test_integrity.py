"A run folder is data, not code: no command unpickles `learner.pkl`, and a damaged finished run is noticed and trained again."
import json, pickle, shutil

import pytest

from conftest import run_main

pytestmark = pytest.mark.slow  # trains models, starts processes or builds pages: the fast loop skips these

TINY = ['--size', '32', '--bs', '16', '--epochs-unfrozen', '1', '--num-workers', '0']


class _Marker:
    "A pickle that, when loaded, creates a file: what a crafted learner.pkl in a downloaded run folder could do"
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (open, (self.path, 'w'))


@pytest.fixture(scope='module')
def tiny_run(small_set, tmp_path_factory):
    run = tmp_path_factory.mktemp('integrity')/'run'
    res = run_main(['train', '--data', small_set, '--run-dir', run, *TINY])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert 'fit_two_stage: stage 1 of 1: body unfrozen, lr 1.00e-02, 1 epoch' in res.stdout  # each stage's table is labelled
    summary = next(l for l in res.stdout.splitlines() if 'ROC AUC' in l and 'validation patches' in l)
    assert summary.endswith('(kaggle-random-80/20)'), summary  # the split's long description stays in the report
    return run


def _copy(run, dest):
    shutil.copytree(run, dest)
    return dest


def test_no_command_unpickles_learner_pkl(tiny_run, small_set, tmp_path):
    from starlette.testclient import TestClient
    from pcam_fastai.runs import load_run
    from pcam_fastai.serve import serve_app
    run, marker = _copy(tiny_run, tmp_path/'run'), tmp_path/'code-ran'
    (run/'learner.pkl').write_bytes(pickle.dumps(_Marker(marker)))
    res = run_main(['train', '--data', small_set, '--run-dir', run, *TINY])  # the same configuration: the finished run is reopened
    assert res.returncode == 0 and 'skipping training' in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
    assert 'ROC AUC' in res.stdout and 'load_learner' not in res.stderr  # the headline again, no pickle warning
    assert run_main(['export', '--run-dir', run, '--bench-patches', '0']).returncode == 0
    assert run_main(['submit', '--run-dir', run, '--out', tmp_path/'sub.csv']).returncode == 0
    learn = load_run(run)
    with TestClient(serve_app(run/'bundle')) as client: assert client.get('/health').status_code == 200
    assert learn.threshold is not None and not marker.exists(), 'a command unpickled learner.pkl'
    pickle.loads((run/'learner.pkl').read_bytes())  # the planted file does run code when unpickled: the test above can fail
    assert marker.exists()


def _damage_truncate(run): (run/'model.pth').write_bytes((run/'model.pth').read_bytes()[:2048])  # the checksum catches any change

def _damage_metrics(run): (run/'metrics.json').write_text('{"accuracy": 0.9, ')


@pytest.mark.parametrize('damage, says', [(_damage_truncate, 'has changed since training finished'),
                                          (_damage_metrics, 'metrics.json is damaged (not JSON')])
def test_damaged_finished_run_is_trained_again(tiny_run, small_set, tmp_path, damage, says):
    from pcam_fastai.runs import load_run
    from pcam_fastai.core import file_sha256
    run = _copy(tiny_run, tmp_path/'run')
    damage(run)
    res = run_main(['train', '--data', small_set, '--run-dir', run, *TINY])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert 'skipping training' not in res.stdout and says in res.stdout and 'Training it again' in res.stdout, res.stdout[-2000:]
    m = json.loads((run/'metrics.json').read_text())
    assert m['model_sha256'] == file_sha256(run/'model.pth')
    load_run(run)  # the retrained model loads


@pytest.fixture(scope='module')
def tiny_bundle(tiny_run):
    res = run_main(['export', '--run-dir', tiny_run, '--bench-patches', '0'])
    assert res.returncode == 0, res.stderr[-3000:]
    return tiny_run/'bundle'


@pytest.mark.parametrize('broken', ['weights.pth', 'model.onnx'])
def test_serve_refuses_a_bundle_it_cannot_run(tiny_bundle, tmp_path, broken):
    from pcam_fastai.export import BundleError
    from pcam_fastai.serve import serve_app
    b = _copy(tiny_bundle, tmp_path/'bundle')
    (b/broken).write_bytes((b/broken).read_bytes()[:1000])
    with pytest.raises(BundleError, match='cannot be served|not a readable weights file|is not the file this bundle was exported with'): serve_app(b)
    res = run_main(['serve', b, '--port', '0'])
    assert res.returncode == 2 and 'Traceback' not in res.stderr and ('export' in res.stderr), res.stderr[-2000:]


def test_serve_on_a_run_folder_points_at_its_bundle(tiny_bundle, tmp_path):
    res = run_main(['serve', tiny_bundle.parent, '--port', '0'])
    assert res.returncode == 2 and f'its bundle is {tiny_bundle}' in res.stderr, res.stderr[-2000:]
    run = tmp_path/'no-bundle'; run.mkdir(); (run/'config.json').write_text('{}')
    res = run_main(['serve', run, '--port', '0'])
    assert res.returncode == 2 and f'pcam-fastai export --run-dir {run}' in res.stderr, res.stderr[-2000:]


def test_failed_export_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    import pcam_fastai.bundling as ex
    run = _copy(tiny_run, tmp_path/'run')
    shutil.rmtree(run/'bundle', ignore_errors=True)
    def broken_onnx(*a, **k): raise RuntimeError('simulated ONNX export failure')
    monkeypatch.setattr(ex, '_export_onnx', broken_onnx)  # fails after weights.pth and bundle.json are written
    with pytest.raises(RuntimeError, match='simulated'): ex.export_bundle(run, bench_patches=0)
    assert not (run/'bundle').exists()
    monkeypatch.undo()
    shutil.rmtree(run/'bundle', ignore_errors=True)
    (run/'model.pth').write_bytes(b'not a model')
    res = run_main(['export', '--run-dir', run, '--bench-patches', '0'])
    assert res.returncode == 2 and 'model.pth' in res.stderr, res.stderr[-2000:]
    assert not (run/'bundle').exists()
    (run/'metrics.json').write_text('garbage')
    res = run_main(['export', '--run-dir', run, '--bench-patches', '0'])
    assert res.returncode == 2 and 'metrics.json is damaged' in res.stderr and 'Expecting value' not in res.stderr.split('(')[0], res.stderr


def test_damaged_config_is_named(tiny_run, small_set, tmp_path):
    from conftest import clean_error
    run = _copy(tiny_run, tmp_path/'run')
    (run/'config.json').write_text('{"key": ')
    for args in (['submit', '--run-dir', run, '--out', tmp_path/'s.csv'], ['export', '--run-dir', run, '--bench-patches', '0'],
                 ['train', '--data', small_set, '--run-dir', run, *TINY]):
        err = clean_error(run_main(args))
        assert f"{run/'config.json'} is damaged (not JSON" in err, (args[0], err)
    assert '--force' in err
    assert run_main(['train', '--data', small_set, '--run-dir', run, *TINY, '--force']).returncode == 0
