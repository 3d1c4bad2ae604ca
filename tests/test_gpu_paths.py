"The GPU-only decisions, checked on a CPU: no host syncs in the batch transforms, one set of stats per device, the device and precision choices, and `bench/gpu_bench.py --smoke` end to end."
import importlib.util, json, os
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pcam_fastai.core import cuda_in_use, compute_device
from pcam_fastai.loader import DihedralBatch, NormalizeBatch, RandomCropBatch
from pcam_fastai.learner import choose_precision
from pcam_fastai.distributed import distrib_fit_ctx, rank_seed
from fastai.torch_core import TensorImage

ROOT = Path(__file__).resolve().parent.parent
# Tensor methods that wait for the device (copy to the host or read a value) or depend on data-dependent sizes
SYNCING = {'nonzero', 'item', 'tolist', 'cpu', 'numpy', '__bool__', 'to', 'masked_select', 'unique'}  # len() reads the shape: no sync


class Calls(TorchFunctionMode):
    "Record the names of the torch functions and tensor methods called"
    def __init__(self): super().__init__(); self.names, self.kwargs = [], []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, '__name__', str(func))); self.kwargs.append(kwargs or {})
        return func(*args, **(kwargs or {}))


def test_dihedral_batch_makes_no_host_sync_and_draws_on_the_inputs_device():
    x = TensorImage(torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8))
    with Calls() as c: DihedralBatch()(x, split_idx=0)
    assert not SYNCING & set(c.names), sorted(SYNCING & set(c.names))
    draws = [kw for n, kw in zip(c.names, c.kwargs) if n == 'randint']
    assert draws and all(kw.get('device') == x.device for kw in draws), draws


def test_crop_makes_no_host_sync():
    x = TensorImage(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    with Calls() as c: RandomCropBatch(max_zoom=2.)(x, split_idx=0)
    assert not SYNCING & set(c.names), sorted(SYNCING & set(c.names))


def test_normalize_builds_its_stats_once_per_device():
    nb, x = NormalizeBatch(), TensorImage(torch.full((2, 3, 4, 4), 100, dtype=torch.uint8))
    nb(x)
    with Calls() as c: nb(x)
    assert 'tensor' not in c.names, c.names  # no torch.tensor(mean/std) per batch
    assert len(nb._on_device) == 1


def test_accelerate_cpu_flag_wins_over_a_gpu():
    with mock.patch.dict(os.environ, {'ACCELERATE_USE_CPU': 'True'}):
        assert cuda_in_use(cuda=True) is False and compute_device().type == 'cpu'
        assert choose_precision(True)[0] is None  # fp32: this process computes on the CPU


@pytest.mark.parametrize('cap, mode', [((7, 5), 'fp16'), ((8, 0), 'bf16'), ((9, 0), 'bf16'), ((6, 1), 'fp16')])
def test_precision_follows_the_compute_capability(cap, mode):
    assert choose_precision(True, cuda=True, capability=cap)[0] == mode
    assert choose_precision(False, cuda=True, capability=cap)[0] is None


def test_each_rank_seeds_its_own_augmentation():
    with mock.patch.dict(os.environ, {'RANK': '2', 'WORLD_SIZE': '4'}): assert rank_seed(42) == 44
    assert rank_seed(42) == 42


def test_sync_batchnorm_is_off_by_default():
    import inspect
    assert inspect.signature(distrib_fit_ctx).parameters['sync_bn'].default is False


@pytest.mark.slow  # about 100 s on 2 CPU cores: trains a few steps of resnet18 several times, a tiny run, and exports it
def test_gpu_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location('gpu_bench', ROOT/'bench'/'gpu_bench.py')
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    out = tmp_path/'gpu_bench.json'
    res = bench.main(['--smoke', '--out', str(out), '--work', str(tmp_path/'work')])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))
    assert not [k for k in res if k.endswith('.ERROR')], {k: v for k, v in res.items() if k.endswith('.ERROR')}
    for k in ('loader.cache.img_s', 'loader.files.img_s', 'train.cache_as_shipped_bs16', 'train.cache_old_defaults_bs16', 'gradcam', 'tta',
              'export.train_pcam', 'export.cpu_only_process', 'bundle_on_device', 'slide_on_device'): assert k in res, k
    assert res['train.cache_as_shipped_bs16']['img_s'] > 0 and any(k.startswith('ceiling.') and k.endswith('.img_s') for k in res)
    assert res['tta']['finite'] and res['gradcam']['finite']
    cpu = res['export.cpu_only_process']
    assert cpu['model_pth_devices'] == ['cpu'] and cpu['cuda_visible'] is False and cpu['bundle_max_abs_diff_vs_this_process'] < 1e-4
    assert res['bundle_on_device']['max_abs_diff_vs_cpu'] < 1e-4 and res['slide_on_device']['tiles_classified'] > 0
