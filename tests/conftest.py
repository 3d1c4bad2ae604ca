"Shared fixtures: the CLI as a user runs it, and one demo run reused by several tests."
import os, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_cli(args, env=None, cwd=None, drop=(), timeout=1200):
    "Run the installed `pcam-fastai` console script in `cwd` (default: a fresh folder); `drop` removes environment variables"
    import tempfile
    if cwd is None:
        with tempfile.TemporaryDirectory(prefix='pcam-cli-') as d: return run_cli(args, env, d, drop, timeout)
    e = {k: v for k, v in os.environ.items() if k not in drop}
    e.update(env or {})
    return subprocess.run([str(BIN/'pcam-fastai'), *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=timeout)


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory):
    """`pcam-fastai train` with no arguments, exactly as the README runs it. In CI it is the README's main job itself, which
    `.ci/run` has just run (it sets PCAM_FASTAI_MAIN_JOB to the folder it ran in): the same command is not trained twice.
    Elsewhere: a fresh run in a fresh folder and home."""
    if main := os.environ.get('PCAM_FASTAI_MAIN_JOB'):
        root, home = Path(main), Path(os.environ.get('PCAM_FASTAI_HOME', Path.home()/'.pcam_fastai'))
        run, log = root/'runs'/'pcam', root/'ci-main-job.log'
        assert (run/'metrics.json').exists() and log.exists(), f'PCAM_FASTAI_MAIN_JOB={main}: no finished main job there'
        res = Result(0, log.read_text(errors='replace'), '')
        res.seconds = None
        print(f'\ndemo run: the main job in {run}')
        return run, home/'synthetic-pcam', res
    base = tmp_path_factory.mktemp('demo')
    t0 = time.time()
    res = run_cli(['train'], env={'PCAM_FASTAI_HOME': str(base/'home')}, cwd=base)
    res.seconds = time.time() - t0
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    print(f'\ndemo run: {res.seconds:.0f} s')
    return base/'runs'/'pcam', base/'home'/'synthetic-pcam', res


@pytest.fixture(scope='session')
def small_set(tmp_path_factory):
    "A small synthetic set in the Kaggle layout"
    from pcam_fastai.data import make_synthetic_pcam
    return make_synthetic_pcam(tmp_path_factory.mktemp('small')/'pcam', n_train=60, n_test=4, seed=3)


class Result:
    def __init__(self, returncode, stdout, stderr): self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(args):
    "Run the CLI's `main` in this process (no 10 s import per call), capturing what it prints"
    import contextlib, io
    from pcam_fastai.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


def clean_error(res):
    "Assert a CLI call failed as a user error (exit 2, no traceback) and return what it printed on stderr"
    assert res.returncode == 2, (res.returncode, res.stdout[-1500:], res.stderr[-3000:])
    assert 'Traceback' not in res.stderr, res.stderr[-3000:]
    return res.stderr


CHROMIUM = os.environ.get('PCAM_FASTAI_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']


def launch_chromium(p):
    "Debian's Chromium (or $PCAM_FASTAI_CHROMIUM) through playwright; else playwright's own browser; else skip, saying why"
    if os.path.exists(CHROMIUM): return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try: return p.chromium.launch(args=CHROMIUM_ARGS)  # e.g. after `playwright install chromium` on GitHub
    except Exception as e: pytest.skip(f'no browser: {CHROMIUM} is missing (apt-get install chromium) and playwright has none ({str(e)[:80]})')


@pytest.fixture(scope='session')
def resnet18_weights(tmp_path_factory):
    "A local torchvision resnet18 weights file (random weights): runs that test the frozen-then-unfrozen recipe use it as 'pretrained'"
    import torch, torchvision
    fn = tmp_path_factory.mktemp('weights')/'resnet18-local.pth'
    torch.manual_seed(0); torch.save(torchvision.models.resnet18().state_dict(), fn)
    return fn
