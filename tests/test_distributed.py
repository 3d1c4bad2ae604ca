"fastai's distrib_ctx on two CPU processes (gloo): launched by torchrun and by accelerate, every rank ends with the same weights."
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains models, starts processes or builds pages: the fast loop skips these

TIMEOUT = 240  # seconds per launch; a hung collective must fail the test, not the CI job
CHECK = Path(__file__).parent/'ddp_check.py'  # the check program: not part of the package
LAUNCH_ENV = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'ACCELERATE_USE_CPU')


def launch(cmd, cwd):
    "Run a launcher command in a clean environment (no inherited rank variables), CPUs only"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1')
    t0 = time.time()
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT)
    res.seconds = time.time() - t0
    return res


def read_ranks(out, n):
    files = sorted(Path(out).glob('rank*.json'))
    assert [f.name for f in files] == [f'rank{r}.json' for r in range(n)], files
    return [json.loads(f.read_text()) for f in files]


def check_ddp(ranks, single):
    "What any correct two-process run must report"
    assert [r['rank'] for r in ranks] == [0, 1]
    for r in ranks: assert (r['world_size'], r['backend'], r['device']) == (2, 'gloo', 'cpu'), r
    # each rank trained on its half of every epoch
    for r in ranks:
        assert abs(r['train_batches'] - single['train_batches'] / 2) <= 1, (r['train_batches'], single['train_batches'])
        assert r['single_process_batches'] == single['train_batches']
    assert abs(sum(r['train_samples'] for r in ranks) - single['train_samples']) <= 2 * single['train_samples'] // single['train_batches']
    # DDP kept the copies identical; validation predictions were gathered from both ranks (13: the last slice was padded)
    assert ranks[0]['params_sha1'] == ranks[1]['params_sha1']
    assert ranks[0]['metrics'] == ranks[1]['metrics']
    for r in ranks: assert r['n_valid_gathered'] == r['n_valid'] == single['n_valid'] == 13, r


@pytest.fixture(scope='module')
def single(tmp_path_factory):
    "The same run in one process (in this process: no launcher, world size 1)"
    for v in LAUNCH_ENV: assert v not in os.environ or v == 'ACCELERATE_USE_CPU', f'{v} is set: the reference must run alone'
    out = tmp_path_factory.mktemp('single')
    run = launch([sys.executable, CHECK, out], cwd=out)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((out/'rank0.json').read_text())
    assert (res['world_size'], res['backend'], res['train_batches']) == (1, 'none', res['single_process_batches'])
    return res


def test_torchrun_two_cpu_processes(single, tmp_path):
    out = tmp_path/'out'
    res = launch([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                  CHECK, out, '--lr-find'], cwd=tmp_path)
    print(f'torchrun: {res.seconds:.0f} s')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    ranks = read_ranks(out, 2)
    check_ddp(ranks, single)
    # lr_find ran on rank 0 alone and both ranks trained with its suggestion
    assert ranks[0]['lr'] == ranks[1]['lr'] != 1e-3
    assert res.stdout.count('distributed: 2 processes on gloo') == 1, res.stdout[-3000:]
    # only rank 0 prints fastai's results table
    assert res.stdout.count('roc_auc_score') == 1, res.stdout[-3000:]


def test_accelerate_launch_multi_gpu_flag_runs_two_cpu_processes(single, tmp_path):
    "`accelerate launch --multi_gpu` uses torchrun underneath; without GPUs, init_distributed picks gloo"
    out = tmp_path/'out'
    res = launch([Path(sys.executable).parent/'accelerate', 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                  '--mixed_precision', 'no', '--dynamo_backend', 'no', CHECK, out], cwd=tmp_path)
    print(f'accelerate launch: {res.seconds:.0f} s')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    check_ddp(read_ranks(out, 2), single)


def test_one_process_helpers_are_no_ops_and_patch_is_installed():
    from fastai.distributed import DistributedDL
    import pcam_fastai.distributed as d
    d.patch_distributed_dl(); d.patch_distributed_dl()
    assert DistributedDL._broadcast is d._broadcast and d._broadcast._fastai_original is not d._broadcast
    assert (d.world_size(), d.rank(), d.is_main(), d.init_distributed()) == (1, 0, True, None)
    d.barrier()
    assert d.broadcast_value({'lr': 1e-3}) == {'lr': 1e-3} and d.run_on_main(max, 2, 3) == 3


def test_half_set_environment_fails_with_what_to_do(monkeypatch):
    from pcam_fastai.distributed import init_distributed
    monkeypatch.setenv('WORLD_SIZE', '2')
    for v in ('RANK', 'MASTER_ADDR', 'MASTER_PORT'): monkeypatch.delenv(v, raising=False)
    with pytest.raises(RuntimeError, match='torchrun --nproc_per_node N'): init_distributed()


def test_train_pcam_on_two_cpu_processes(tmp_path, resnet18_weights):
    "The CLI's own train, launched with torchrun: one run folder, written once, with world size 2 recorded and each epoch logged once"
    from pcam_fastai.data import make_synthetic_pcam
    data = make_synthetic_pcam(tmp_path/'data', n_train=96, n_test=4, seed=5)
    run = tmp_path/'run'
    res = launch([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'pcam_fastai.cli', 'train',
                  '--data', data, '--preset', 'cpu-demo', '--arch', 'resnet18', '--weights-path', resnet18_weights, '--bs', '32', '--size', '32', '--epochs-frozen', '1', '--epochs-unfrozen', '1',
                  '--lr-find-iters', '10', '--run-dir', run], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = json.loads((run/'metrics.json').read_text())
    assert (m['world_size'], m['global_bs']) == (2, 64)
    assert m['n_valid'] == 19  # every validation patch scored once, by rank 0 alone
    assert res.stdout.count('train_pcam: accuracy') == 1 and 'distributed: 2 processes on gloo' in res.stdout
    hist = (run/'history.csv').read_text().splitlines()
    assert [l.split(',')[:2] for l in hist[1:]] == [['stage1-frozen', '0'], ['stage2-unfrozen', '0']]
    assert 'x 2 processes (global batch 64)' in (run/'report.md').read_text()
