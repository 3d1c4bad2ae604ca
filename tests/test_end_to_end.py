"The README's main job, run as a user would, and what it leaves behind."
import json, subprocess, sys

import numpy as np
import pandas as pd
import torch

from conftest import BIN


def test_console_script_installed():
    assert (BIN/'pcam-fastai').exists()


def test_train_module_importable_from_fresh_process():
    code = ("import sys; from pcam_fastai.train import train_pcam, fit_two_stage, find_lr, PRESETS, LRSuggestion; "
            "from pcam_fastai.data import pcam_dataloaders; "
            "assert 'kaggle' not in sys.modules, 'kaggle must be imported lazily'; print('ok')")
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stderr[-2000:]


def test_demo_run_writes_everything(demo_run):
    run, data, res = demo_run
    for f in ('model.pth', 'learner.pkl', 'metrics.json', 'config.json', 'report.md', 'history.csv', 'history.png',
              'lr_find_frozen.png', 'lr_find_unfrozen.png', 'top_losses_gradcam.png', 'false_negatives_gradcam.png',
              'false_positives_gradcam.png', 'confident_gallery.png', 'roc_valid.png', 'confusion_valid.png',
              'models/stage1-frozen.pth', 'models/stage2-unfrozen.pth'):
        assert (run/f).exists() and (run/f).stat().st_size > 0, f
    m = json.loads((run/'metrics.json').read_text())
    assert m['roc_auc'] >= 0.9, m
    assert m['split'].startswith('kaggle-random') and 'optimistic' in m['split']
    assert m['synthetic'] is True and m['preset'] == 'cpu-demo'
    assert set(m['stages']) == {'stage1-frozen', 'stage2-unfrozen'}
    lo, hi = m['stages']['stage2-unfrozen']['lr']
    assert abs(hi/lo - 10) < 1e-6  # discriminative learning rates
    # the run says which data and which precision it used
    assert 'built-in synthetic PCam' in res.stdout
    if not torch.cuda.is_available(): assert 'precision: fp32: fp16 was requested but there is no CUDA GPU' in res.stdout


def test_model_pth_is_a_plain_state_dict(demo_run):
    run, _, _ = demo_run
    sd = torch.load(run/'model.pth', weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert len(sd) > 100 and sd['0.0.weight'].shape == (64, 3, 7, 7)  # a resnet18 body plus fastai's head


def _positives(data, n=24):
    labels = pd.read_csv(data/'train_labels.csv')
    return [data/'train'/f'{i}.tif' for i in labels[labels.label == 1].id[:n]]


def test_gradcam_on_trained_model(demo_run):
    from fastai.learner import load_learner
    from pcam_fastai.interpret import gradcam, centre_ratio
    run, data, _ = demo_run
    learn = load_learner(run/'learner.pkl', cpu=True)
    xb = learn.dls.test_dl(_positives(data)).one_batch()[0]
    cams = gradcam(learn, xb, target=1)
    assert cams.shape == (len(xb), *xb.shape[-2:])
    assert (cams >= 0).all()
    ratios = centre_ratio(cams)
    print('centre/outside Grad-CAM ratio on positives:', np.round(ratios.numpy(), 2))
    assert ratios.median() > 1 and (ratios > 1).float().mean() >= 0.75
    raw = gradcam(learn, xb, normalize=False)
    assert (raw >= 0).all()
