"""GPU benchmark of the card's recipe (ResNet50 at 224 px from the array cache), side by side with a plain-PyTorch ceiling.

    python bench/gpu_bench.py [--out results.json] [--work DIR]     # one GPU, under 5 minutes
    python bench/gpu_bench.py --smoke                              # tiny sizes, runs on a CPU (the test suite does this)

It prints, and writes as JSON (after every figure, so a run cut short keeps what it measured):
- loader-only images/s: the array cache and the file loader (model-ready batches on the device);
- training images/s as shipped (`pcam_learner` + the cache loader: bf16 on compute capability >= 8, else fp16; channels-last;
  cuDNN autotuning), the old defaults (fp16 with loss scaling, NCHW, cuDNN deterministic), and each speed option
  (fused AdamW, bs 256), with the peak GPU memory of each;
- a plain-PyTorch ceiling in the same run: the same model, channels-last, bf16 autocast, fused AdamW, synthetic tensors
  already on the GPU, at bs 64 and 256;
- host syncs per training step, split into this package's code and the rest (fastai, torch);
- Grad-CAM and 8-way TTA under autocast, against fp32 (finite, and how far apart);
- a run trained on the GPU by `train_pcam`, exported, and loaded in a CPU-only process (`CUDA_VISIBLE_DEVICES=''`):
  `torch.load(model.pth, weights_only=True)` and `load_bundle(...).predict`;
- the bundle on this device (`device='auto'`: onnxruntime-gpu, else torch on the GPU) against the CPU, in patches/s and how far
  apart, and `slide_heatmap` on a sparse slide of real-size (40,000 px) with that bundle, in tiles/s.
The data are the package's synthetic patches: speed does not depend on what the pixels show.
"""
import argparse, collections, json, os, subprocess, sys, tempfile, time, traceback, warnings
from functools import partial
from pathlib import Path

warnings.filterwarnings('ignore', message=r'.*jit\.script.*')
import numpy as np
import torch

CUDA = torch.cuda.is_available()
RESULTS = {}


def sync():
    if CUDA: torch.cuda.synchronize()


def log(out, key, value):
    "Record one figure, print it, and rewrite the JSON file"
    RESULTS[key] = value
    print(f'{key}: {value}', flush=True)
    if out: Path(out).write_text(json.dumps(RESULTS, indent=1, default=str))


def section(out, name, fn):
    "Run one part; an error is recorded (and printed) and the next part still runs"
    t0 = time.time()
    try: fn()
    except Exception as e:
        log(out, f'{name}.ERROR', f'{type(e).__name__}: {e}'[:500]); traceback.print_exc()
    log(out, f'{name}.seconds', round(time.time() - t0, 1))


def peak_gib():
    if not CUDA: return None
    v = round(torch.cuda.max_memory_allocated() / 2**30, 2); torch.cuda.reset_peak_memory_stats()
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--smoke', action='store_true', help='Tiny sizes (resnet18, 64 px, a few steps): checks the script on a CPU')
    ap.add_argument('--out', default=None, help='JSON file for the results (default: $OUT/gpu_bench.json when $OUT is set)')
    ap.add_argument('--work', default=None, help='Folder for the data, cache and run (default: a temporary folder, removed at the end)')
    a = ap.parse_args(argv)
    out = a.out or (str(Path(os.environ['OUT'])/'gpu_bench.json') if os.environ.get('OUT') else None)
    arch, size, n, warm, steps, bs, big_bs = ('resnet18', 64, 160, 1, 2, 16, 32) if a.smoke else ('resnet50', 224, 4096, 10, 30, 64, 256)
    tmp = None
    if a.work is None: tmp = tempfile.TemporaryDirectory(prefix='gpu-bench-'); work = Path(tmp.name)
    else: work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    try: run_all(out, work, arch, size, n, warm, steps, bs, big_bs, a.smoke)
    finally:
        if tmp is not None: tmp.cleanup()
    return RESULTS


def run_all(out, work, arch, size, n, warm, steps, bs, big_bs, smoke):
    from fastai.callback.core import Callback, CancelFitException
    from fastai.callback.channelslast import ChannelsLast
    from fastai.callback.fp16 import MixedPrecision
    from fastai.optimizer import OptimWrapper
    from fastai.torch_core import find_bs
    from pcam_fastai.data import make_synthetic_pcam
    from pcam_fastai.cache import build_cache
    from pcam_fastai.sources import pcam_dataloaders
    from pcam_fastai.loader import PatchArrays
    from pcam_fastai.learner import pcam_learner, choose_precision
    from pcam_fastai.train import seed_run

    t_start = time.time()
    log(out, 'env', dict(torch=torch.__version__, device=torch.cuda.get_device_name() if CUDA else 'cpu',
                         capability=torch.cuda.get_device_capability() if CUDA else None, cpus=os.cpu_count(), arch=arch, size=size,
                         precision_as_shipped=choose_precision(True)[1], smoke=smoke))
    src = make_synthetic_pcam(work/'synth', n_train=n, n_test=32, seed=0, show_progress=False)
    cache = build_cache(src, work/'cache', show_progress=False)
    log(out, 'data.seconds', round(time.time() - t_start, 1))
    workers = min(16, os.cpu_count() or 1)

    class Timer(Callback):
        "Training images/s over `steps` batches after `warm`, then stop (no validation)"
        order = 99
        def before_fit(self): self.i, self.ips = 0, float('nan')
        def before_batch(self):
            if self.i == warm: sync(); self.t = time.perf_counter()
        def after_batch(self):
            self.i += 1
            if self.i == warm + steps:
                sync(); self.ips = steps * find_bs(self.yb) / (time.perf_counter() - self.t); raise CancelFitException()

    def cache_dls(bs):
        dls = pcam_dataloaders(cache, size=size, bs=bs)
        ds = dls.train.dataset  # rows repeated, so that one epoch covers the warm-up and the timed steps
        reps = int(np.ceil((warm + steps + 1) * bs / len(ds.idxs)))
        dls.loaders[0] = dls.train.new(PatchArrays(ds.images, ds.labels, np.tile(ds.idxs, reps), split_idx=0))
        return dls

    class ToNCHW(Callback):
        "Batches back to contiguous NCHW, as the loader made them before (it now keeps channels-last on CUDA)"
        order = -2
        def before_batch(self): self.learn.xb = tuple(x.contiguous() for x in self.xb)

    def old_defaults(learn):
        "What the package did before: fp16 with loss scaling, NCHW model and batches, cuDNN deterministic"
        learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, (ChannelsLast, MixedPrecision))])
        learn.model.to(memory_format=torch.contiguous_format)
        learn.add_cb(ToNCHW())
        if CUDA: learn.to_fp16()
        return learn

    def train_ips(name, dls, deterministic=False, fused=False, change=None):
        seed_run(0, deterministic)
        kw = dict(opt_func=partial(OptimWrapper, opt=partial(torch.optim.AdamW, fused=True))) if fused and CUDA else {}
        learn = pcam_learner(dls, arch, pretrained=False, fp16=True, quiet=True, **kw)
        if change: change(learn)
        tm = Timer(); learn.fit(1, 1e-3, cbs=tm)
        log(out, f'train.{name}', dict(img_s=round(tm.ips, 1), peak_GiB=peak_gib(), precision=learn.precision if not change else 'fp16 AMP, NCHW, deterministic'))
        return learn

    def loaders():
        for name, dls in (('cache', pcam_dataloaders(cache, size=size, bs=bs)),
                          ('files', pcam_dataloaders(src, size=size, bs=bs, num_workers=workers))):
            it = iter(dls.train)
            for _ in range(2): next(it)
            sync(); t, k = time.perf_counter(), 0
            for _ in range(max(1, min(30, len(dls.train) - 3))): k += len(next(it)[0])
            sync(); log(out, f'loader.{name}.img_s', round(k / (time.perf_counter() - t), 1))
    section(out, 'loader', loaders)

    learners = {}
    # one section each: a failure (out of memory at bs 256, say) loses that row only
    section(out, 'train_shipped', lambda: learners.update(shipped=train_ips(f'cache_as_shipped_bs{bs}', cache_dls(bs))))
    section(out, 'train_old', lambda: train_ips(f'cache_old_defaults_bs{bs}', cache_dls(bs), deterministic=True, change=old_defaults))
    section(out, 'train_fused', lambda: train_ips(f'cache_fused_adamw_bs{bs}', cache_dls(bs), fused=True))
    section(out, 'train_big', lambda: train_ips(f'cache_fused_adamw_bs{big_bs}', cache_dls(big_bs), fused=True))
    section(out, 'train_files', lambda: train_ips(f'files_as_shipped_bs{bs}', pcam_dataloaders(src, size=size, bs=bs, num_workers=workers)))

    def ceiling():
        import torchvision
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        dev = 'cuda' if CUDA else 'cpu'
        for cbs in (bs, big_bs):
            m = getattr(torchvision.models, arch)(num_classes=2).to(dev).to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(m.parameters(), 1e-3, fused=CUDA)
            x = torch.randn(cbs, 3, size, size, device=dev).to(memory_format=torch.channels_last)
            y = torch.randint(0, 2, (cbs,), device=dev)
            for i in range(warm + steps):
                if i == warm: sync(); t = time.perf_counter()
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=CUDA):
                    loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            sync(); log(out, f'ceiling.bs{cbs}_channels_last_bf16_fused.img_s', round(steps * cbs / (time.perf_counter() - t), 1))
            del m, opt, x
            log(out, f'ceiling.bs{cbs}.peak_GiB', peak_gib())
    section(out, 'ceiling', ceiling)

    def syncs():
        if not CUDA: return log(out, 'syncs', 'skipped: no GPU')
        learn = pcam_learner(cache_dls(bs), arch, pretrained=False, fp16=True, quiet=True)
        seen = []
        class SyncCount(Callback):
            order = 99
            def before_fit(self): self.i = 0
            def before_batch(self):
                if self.i == warm:
                    torch.cuda.set_sync_debug_mode('warn')
                    self.cm = warnings.catch_warnings(record=True); self.w = self.cm.__enter__(); warnings.simplefilter('always')
            def after_batch(self):
                self.i += 1
                if self.i == warm + 3:
                    torch.cuda.set_sync_debug_mode(0); self.cm.__exit__(None, None, None)
                    seen.extend(w for w in self.w if 'synchroniz' in str(w.message)); raise CancelFitException()
        learn.fit(1, 1e-3, cbs=SyncCount())
        sites = collections.Counter(f'{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}' for w in seen)
        ours = sum(c for s, c in sites.items() if s.startswith('pcam_fastai/'))
        log(out, 'syncs.per_step', dict(pcam_fastai=round(ours / 3, 1), other=round((sum(sites.values()) - ours) / 3, 1)))
        log(out, 'syncs.sites', dict(sites.most_common(12)))
    section(out, 'syncs', syncs)

    def gradcam_and_tta():
        from pcam_fastai.interpret import gradcam
        from pcam_fastai.evaluate import predict
        learn = learners.get('shipped') or pcam_learner(cache_dls(bs), arch, pretrained=False, fp16=True, quiet=True)
        xb = next(iter(learn.dls.valid))[0][:16]
        with torch.no_grad(): target = learn.model.eval()(xb).argmax(1)  # the same class in both precisions
        sync(); t = time.perf_counter(); c32 = gradcam(learn, xb, target=target); sync()
        rec = dict(fp32_ms=round(1e3 * (time.perf_counter() - t)), finite=bool(torch.isfinite(c32).all()))
        if CUDA:
            with torch.autocast('cuda', dtype=torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16):
                ch = gradcam(learn, xb, target=target)
            rec.update(autocast_finite=bool(torch.isfinite(ch).all()), autocast_max_abs_diff=round(float((ch - c32).abs().max()), 4))
        log(out, 'gradcam', rec)
        dl = learn.dls.valid; k = len(dl.dataset)
        predict(learn, dl, tta=True)  # warm-up: the first pass pays for kernel selection
        sync(); t = time.perf_counter(); p_amp, _ = predict(learn, dl, tta=True); sync(); s_amp = time.perf_counter() - t
        mp = [cb for cb in learn.cbs if isinstance(cb, MixedPrecision)]
        learn.remove_cbs(mp)  # fp32: what predict did before it followed the learner's precision
        sync(); t = time.perf_counter(); p32, _ = predict(learn, dl, tta=True); sync(); s32 = time.perf_counter() - t
        learn.add_cbs(mp)
        log(out, 'tta', dict(as_shipped_img_s=round(8 * k / s_amp, 1), fp32_img_s=round(8 * k / s32, 1), finite=bool(torch.isfinite(p_amp).all()),
                             max_abs_diff_prob=round(float((p_amp - p32).abs().max()), 4), peak_GiB=peak_gib()))
    section(out, 'gradcam_tta', gradcam_and_tta)

    def export():
        from pcam_fastai.train import train_pcam
        from pcam_fastai.bundling import export_bundle
        from pcam_fastai.export import load_bundle
        from pcam_fastai.runs import load_run
        run = work/'run'
        t = time.time()
        _, m = train_pcam(cache, run_dir=run, preset='card', arch=arch, size=size, pretrained=False, epochs_frozen=0, epochs_unfrozen=1,
                          lr_unfrozen=1e-3, n_items=min(n, 1024), bs=bs, num_workers=0, top_k=4, force=True)
        log(out, 'export.train_pcam', dict(seconds=round(time.time() - t, 1), precision=m['compute_precision'], device=m['device']))
        learn = load_run(run)
        log(out, 'export.load_run_model_device', str(next(learn.model.parameters()).device))
        dest = export_bundle(run, bench_patches=32, bs=16)
        files = sorted((src/'train').glob('*.tif'))[:16]
        p_here = load_bundle(dest).predict(files)[:, 1]
        code = ("import json, sys, torch; from pcam_fastai.export import load_bundle; r = {'cuda_visible': torch.cuda.is_available()}\n"
                f"sd = torch.load({str(run/'model.pth')!r}, weights_only=True); r['model_pth_devices'] = sorted({{str(v.device) for v in sd.values()}})\n"
                f"p = load_bundle({str(dest)!r}).predict({[str(f) for f in files]!r})[:, 1]; r['bundle_probs'] = [float(v) for v in p]\n"
                "print(json.dumps(r))")
        res = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''}, capture_output=True, text=True, timeout=300)
        if res.returncode: return log(out, 'export.cpu_only_process', f'failed: {res.stderr[-600:]}')
        r = json.loads(res.stdout.strip().splitlines()[-1])
        diff = float(np.abs(np.asarray(r.pop('bundle_probs')) - np.asarray(p_here)).max())
        log(out, 'export.cpu_only_process', dict(r, bundle_max_abs_diff_vs_this_process=round(diff, 6)))
    section(out, 'export', export)

    def bundle_and_slide():
        "The exported bundle where a slide user runs it: on this device (auto) against the CPU, then a sparse slide's heatmap"
        from PIL import Image
        from pcam_fastai.export import load_bundle
        from pcam_fastai.heatmap import slide_heatmap
        from pcam_fastai.testslides import make_sparse_slide
        dest = work/'run'/'bundle'
        if not (dest/'bundle.json').exists(): return log(out, 'bundle_on_device', 'skipped: the export section did not finish')
        b, b_cpu = load_bundle(dest), load_bundle(dest, device='cpu')
        x = np.random.default_rng(0).integers(0, 256, (64 if smoke else 1024, size, size, 3), dtype=np.uint8)
        b.predict(x[:bs], bs=bs)  # warm-up
        sync(); t = time.perf_counter(); p = b.predict(x, bs=big_bs); sync(); s_dev = time.perf_counter() - t
        t = time.perf_counter(); p_cpu = b_cpu.predict(x[:64], bs=64); s_cpu = time.perf_counter() - t
        log(out, 'bundle_on_device', dict(backend=b.backend, device=str(b.device), patches_per_s=round(len(x) / s_dev, 1),
                                          cpu_backend=b_cpu.backend, cpu_patches_per_s=round(64 / s_cpu, 1),
                                          max_abs_diff_vs_cpu=float(np.abs(p[:64] - p_cpu).max())))
        files = sorted((src/'train').glob('*.tif'))[:64]
        patches = np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files])
        side = 8_000 if smoke else 40_000
        slide = make_sparse_slide(work/'sparse.tif', patches, np.zeros(len(patches), int), width=side, height=side, islands=4)
        res = slide_heatmap(slide.path, b, work/'slides', tissue_threshold=20, min_tissue=0.05, show_progress=False, force=True)[0]
        log(out, 'slide_on_device', dict(side_px=side, tiles_classified=res['tiles_classified'], tiles_per_second=res['tiles_per_second'],
                                         seconds=res['seconds'], backend=res['model_backend'], device=res['model_device'], peak_GiB=peak_gib()))
    section(out, 'bundle_and_slide', bundle_and_slide)

    log(out, 'total_seconds', round(time.time() - t_start, 1))
    print('\n' + table(), flush=True)


def table() -> str:
    "Training throughput side by side with the plain-PyTorch ceiling"
    ceil = {k: v for k, v in RESULTS.items() if k.startswith('ceiling.') and k.endswith('.img_s')}
    best = max(ceil.values(), default=None)
    rows = ['| training, img/s | img/s | of the best ceiling | peak GiB |', '|---|---|---|---|']
    for k, v in RESULTS.items():
        if k.startswith('train.') and isinstance(v, dict):
            share = f"{v['img_s'] / best:.0%}" if best else '-'
            rows.append(f"| {k[6:]} | {v['img_s']} | {share} | {v.get('peak_GiB') or '-'} |")
    for k, v in ceil.items(): rows.append(f'| plain PyTorch {k[8:-6]} | {v} | {v / best:.0%} | {RESULTS.get(k.split("_")[0] + ".peak_GiB") or "-"} |')
    return '\n'.join(rows)


if __name__ == '__main__': main()
