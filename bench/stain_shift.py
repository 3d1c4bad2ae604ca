"""Stain-shift benchmark: the CPU recipe with and without stain handling, on held-out real PCam tiles as they are and under a fixed stain shift.

    python bench/stain_shift.py                                  # ../shared/real-pcam; variants none, aug, norm, both
    python bench/stain_shift.py --variants none,aug --strengths 0,0.1,0.2,0.3 --work /tmp/stain --out stain.json

The held-out part is the one of `bench/real_pcam.py` (sha1("pcam-bench:" + id) % 5 == 0). Variants, each trained with
`train_pcam` (the `cpu-demo` preset, seed 42) on the training part:

- none: as shipped;
- aug: stain augmentation in H&E space (`stain_aug`, `HEDJitterBatch`; strength `--aug`, default 0.05, Tellez et al.'s "HED-light");
- norm: Macenko normalization through the package (`train_pcam(stain_norm='macenko')`): fitted on the 8 training tiles with
  the most tissue among the first 500 of the run's training split, applied once into a normalized cache, and to every
  held-out tile by the learner's `test_dl` (tiles with too little tissue are left as they are, the normalizer's default);
- both: norm and aug.

The held-out tiles are scored as they are (strength 0) and after `stain_shift(strength)`: the haematoxylin density times
(1 + strength), the eosin density times (1 - strength). The table gives the held-out AUC of each variant under each shift,
and the speed of normalization and augmentation. Nothing about the held-out part is used before scoring.
"""
from __future__ import annotations
import argparse, importlib.util, json, sys, tempfile, time, warnings
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location('real_pcam', HERE/'real_pcam.py')
real_pcam = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(real_pcam)


def held_out_probs(learn, arrays:dict) -> dict:
    "p(tumour) of the run's learner (its calibration and TTA) on each set of uint8 patches"
    from pcam_fastai.evaluate import predict
    return {k: predict(learn, learn.dls.test_dl(v))[0][:, 1].numpy() for k, v in arrays.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--data', default=str(real_pcam.DEFAULT_DATA), help='Kaggle-layout folder of real tiles (default: ../shared/real-pcam)')
    ap.add_argument('--work', default=None, help='Folder for the split, caches and runs (default: a temporary folder, removed at the end)')
    ap.add_argument('--out', default=None, help='Write the results as JSON here (after every variant)')
    ap.add_argument('--variants', default='none,aug,norm,both')
    ap.add_argument('--strengths', default='0,0.1,0.2,0.3')
    ap.add_argument('--aug', type=float, default=0.05, help='Stain augmentation strength of the aug and both variants')
    ap.add_argument('--preset', default='cpu-demo')
    ap.add_argument('--epochs', type=int, default=None, help="Epochs (default: the preset's)")
    ap.add_argument('--seed', type=int, default=42)
    a = ap.parse_args(argv)
    src = Path(a.data)
    if not (src/'train_labels.csv').exists(): sys.exit(f'{src} is not a Kaggle-layout folder (train/<id>.tif and train_labels.csv); pass --data DIR.')
    variants = [v for v in a.variants.split(',') if v]
    if unknown := set(variants) - {'none', 'aug', 'norm', 'both'}: sys.exit(f'unknown variants {sorted(unknown)}')
    strengths = [float(s) for s in a.strengths.split(',')]
    warnings.filterwarnings('ignore', message=r'.*jit\.script.*')
    import torch
    from fastai.torch_core import TensorImage
    from pcam_fastai.stain import StainNormalizer, StainNormalizeBatch, HEDJitterBatch, stain_shift, choose_reference
    from pcam_fastai.train import train_pcam
    from sklearn.metrics import roc_auc_score
    tmp = None
    if a.work is None: tmp = tempfile.TemporaryDirectory(prefix='stain-bench-'); work = Path(tmp.name)
    else: work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    res = dict(date=time.strftime('%Y-%m-%d'), data=str(src), strengths=strengths, aug_strength=a.aug, auc={}, runs={})
    def save():
        if a.out: Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    try:
        train_dir, held = real_pcam.split_folder(src, work)
        tr = pd.read_csv(train_dir/'train_labels.csv', dtype={'id': str})
        y = held.label.values
        raw = real_pcam.read_patches(src, held.id)
        shifted = {s: stain_shift(torch.from_numpy(raw).permute(0, 3, 1, 2), s).permute(0, 2, 3, 1).contiguous().numpy() for s in strengths}
        print(f'stain_shift: {len(tr)} training tiles, {len(held)} held out ({int(y.sum())} tumour); shifts {strengths}', flush=True)

        if {'norm', 'both'} & set(variants):  # the speed of normalization alone, on the training part's tiles
            first = real_pcam.read_patches(train_dir, tr.id[:500])
            normalizer = StainNormalizer('macenko').fit(choose_reference(first))
            t = time.perf_counter(); _, skipped = normalizer.normalize_many(first); dt = time.perf_counter() - t
            res['speed_normalize_patches_per_s'] = round(len(first) / dt, 1)
            xb = TensorImage(torch.from_numpy(first[:64]).permute(0, 3, 1, 2).contiguous())
            t = time.perf_counter(); StainNormalizeBatch(normalizer)(xb); res['speed_normalize_batch_patches_per_s_bs64'] = round(64 / (time.perf_counter() - t), 1)
            print(f'stain_shift: Macenko {res["speed_normalize_patches_per_s"]} patches/s one by one, {res["speed_normalize_batch_patches_per_s_bs64"]} as a batch '
                  f'transform at bs 64; {len(skipped)} of {len(first)} tiles left as they were (too little tissue)', flush=True)
        xb = TensorImage(torch.from_numpy(raw[:64]).permute(0, 3, 1, 2).contiguous())
        jit = HEDJitterBatch(a.aug); jit(xb, split_idx=0)
        t = time.perf_counter()
        for _ in range(10): jit(xb, split_idx=0)
        res['speed_hed_jitter_patches_per_s_bs64'] = round(640 / (time.perf_counter() - t), 1)
        save()

        for v in variants:
            t = time.time()
            learn, m = train_pcam(train_dir, run_dir=work/f'run-{v}', cache=work/'cache', preset=a.preset, epochs_unfrozen=a.epochs, seed=a.seed,
                                  num_workers=0, force=True, stain_aug=a.aug if v in ('aug', 'both') else 0.,
                                  stain_norm='macenko' if v in ('norm', 'both') else None)
            if v in ('norm', 'both'): res['normalizer'] = learn.dls.stain_normalizer.to_dict()
            probs = held_out_probs(learn, shifted)  # raw tiles: a normalizing run's test_dl normalizes them as training did
            res['auc'][v] = {str(s): round(float(roc_auc_score(y, p)), 4) for s, p in probs.items()}
            res['runs'][v] = dict(seconds=round(time.time() - t, 1), valid_auc=m['roc_auc'], stain_aug=a.aug if v in ('aug', 'both') else 0.)
            print(f'stain_shift: {v}: held-out AUC by shift {res["auc"][v]} ({res["runs"][v]["seconds"]:.0f} s)', flush=True)
            save()
        res['table'] = table(res)
        print('\n' + res['table'])
        save()
        return res
    finally:
        if tmp is not None: tmp.cleanup()


def table(res:dict) -> str:
    "Held-out AUC of each variant under each stain shift, as markdown"
    s = res['strengths']
    names = dict(none='no stain handling', aug=f"augmentation (HED jitter {res['aug_strength']})", norm='Macenko normalization', both='normalization + augmentation')
    rows = ['| held-out AUC | ' + ' | '.join('as they are' if not x else f'shift {x}' for x in s) + ' |', '|---|' + '---|' * len(s)]
    for v, auc in res['auc'].items(): rows.append(f'| {names[v]} | ' + ' | '.join(f'{auc[str(x)]:.4f}' for x in s) + ' |')
    return '\n'.join(rows)


if __name__ == '__main__': main()
