"""The distributed check: train a tiny synthetic PCam model under `distrib_fit_ctx` and write what each process saw to OUT/rank<r>.json.

    python tests/ddp_check.py OUT                                             # one process
    torchrun --standalone --nproc_per_node 2 tests/ddp_check.py OUT --lr-find  # two processes (gloo on CPUs, nccl on GPUs)

`tests/test_distributed.py` launches it with torchrun and `accelerate launch` and compares the ranks with a one-process run.
"""
from __future__ import annotations
import argparse, hashlib, json, time
from pathlib import Path

import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.torch_core import find_bs, set_seed

from pcam_fastai.data import make_synthetic_pcam
from pcam_fastai.sources import pcam_dataloaders
from pcam_fastai.learner import pcam_learner
from pcam_fastai.distributed import init_distributed, is_main, rank, world_size, barrier, run_on_main, distrib_fit_ctx
from pcam_fastai.training import find_lr


class BatchCounter(Callback):
    "Count the training batches and samples this process sees"
    order = 12  # after DistributedTrainer has wrapped the loaders
    def before_fit(self): self.batches, self.samples = 0, 0
    def after_batch(self):
        if self.training: self.batches, self.samples = self.batches + 1, self.samples + find_bs(self.yb)

def params_checksum(model, # A model
                   ) -> str:
    "SHA1 of all parameters (in order, as float32 bytes): equal checksums mean identical weights"
    h = hashlib.sha1()
    for p in model.parameters(): h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

def n_gathered(learn):
    "How many validation predictions the last `AccumMetric` (ROC AUC) was computed from"
    from fastai.metrics import AccumMetric
    ms = [m for m in learn.metrics if isinstance(m, AccumMetric) and getattr(m, 'targs', None)]
    return int(sum(len(t) for t in ms[-1].targs)) if ms else None

def parser():
    p = argparse.ArgumentParser(prog='python tests/ddp_check.py',
        description="Train a tiny PCam model under distrib_fit_ctx and write OUT/rank<r>.json per process. "
                    "Launch with: torchrun --standalone --nproc_per_node 2 tests/ddp_check.py OUT")
    p.add_argument('out', help='Folder for rank<r>.json (and the synthetic data set, unless --data)')
    p.add_argument('--data', help='Kaggle-layout folder; default: a synthetic set made in OUT/data')
    p.add_argument('--n-train', type=int, default=65, help='Synthetic patches (20 %% of them validate)')
    p.add_argument('--size', type=int, default=32, help='Image side in pixels')
    p.add_argument('--bs', type=int, default=8, help='Batch size per process')
    p.add_argument('--arch', default='resnet18', help='torchvision model name')
    p.add_argument('--epochs', type=int, default=1)
    p.add_argument('--lr', type=float, default=1e-3, help='Learning rate (ignored with --lr-find)')
    p.add_argument('--lr-find', action='store_true', help='Learning rate from find_lr on rank 0, broadcast to all')
    p.add_argument('--seed', type=int, default=0)
    return p

def main(argv=None, # Command-line arguments; None: sys.argv[1:]
        ) -> dict: # What this rank wrote to OUT/rank<r>.json
    "Train a tiny synthetic PCam model under `distrib_fit_ctx` and write what this process saw to OUT/rank<r>.json"
    args = parser().parse_args(argv)
    t0 = time.time()
    backend = init_distributed()  # first, so that fastai's default device is this process's GPU
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out/'data'
    if not args.data and is_main(): make_synthetic_pcam(data, n_train=args.n_train, n_test=4, seed=args.seed, show_progress=False)
    barrier()  # the others wait until rank 0 has written the data set
    dls = pcam_dataloaders(data, size=args.size, bs=args.bs, num_workers=0, seed=args.seed)
    set_seed(args.seed)
    learn = pcam_learner(dls, args.arch, pretrained=False, fp16=False, quiet=True, path=out)
    lr = args.lr
    if args.lr_find:
        lr = run_on_main(find_lr, learn, num_it=20, show=False).valley
    counter = BatchCounter()
    with distrib_fit_ctx(learn): learn.fit_one_cycle(args.epochs, lr, cbs=counter)
    names, vals = learn.recorder.metric_names[1:-1], learn.recorder.values[-1]
    res = dict(rank=rank(), world_size=world_size(), backend=backend or 'none', device=str(next(learn.model.parameters()).device),
               train_batches=counter.batches, train_samples=counter.samples, single_process_batches=len(dls.train),
               n_train=len(dls.train_ds), n_valid=len(dls.valid_ds), n_valid_gathered=n_gathered(learn), lr=lr,
               params_sha1=params_checksum(learn.model), metrics={n: float(v) for n, v in zip(names, vals)},
               seconds=round(time.time() - t0, 1))
    (out/f'rank{res["rank"]}.json').write_text(json.dumps(res, indent=2))
    barrier()
    return res

if __name__ == '__main__':
    try: main()
    finally:
        if dist.is_available() and dist.is_initialized(): dist.destroy_process_group()
