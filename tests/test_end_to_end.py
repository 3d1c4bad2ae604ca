"The README's main job, run as a user would, and what it leaves behind."
import json, subprocess, sys

import numpy as np
import pandas as pd
import torch

from conftest import BIN

import pytest
pytestmark = pytest.mark.slow  # trains models, starts processes or builds pages: the fast loop skips these


def test_console_script_installed():
    assert (BIN/'pcam-fastai').exists()


def test_train_module_importable_from_fresh_process():
    code = ("import sys; from pcam_fastai.train import train_pcam; from pcam_fastai.settings import PRESETS; from pcam_fastai.training import fit_two_stage, find_lr, LRSuggestion; "
            "from pcam_fastai.sources import pcam_dataloaders; "
            "assert 'kaggle' not in sys.modules, 'kaggle must be imported lazily'; print('ok')")
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stderr[-2000:]


def test_demo_run_writes_everything(demo_run):
    run, data, res = demo_run
    for f in ('model.pth', 'learner.pkl', 'metrics.json', 'config.json', 'report.md', 'history.csv', 'history.png',
              'top_losses_gradcam.png', 'false_negatives_gradcam.png', 'reliability_valid.png',
              'false_positives_gradcam.png', 'confident_gallery.png', 'roc_valid.png', 'confusion_valid.png', 'models/stage2-unfrozen.pth'):
        assert (run/f).exists() and (run/f).stat().st_size > 0, f
    m = json.loads((run/'metrics.json').read_text())
    assert m['roc_auc'] >= 0.9, m
    assert m['split'].startswith('kaggle-random') and 'optimistic' in m['split']
    assert m['synthetic'] is True and m['preset'] == 'cpu-demo'
    # from scratch: no frozen stage, one learning rate (the preset's), and the report says so
    assert set(m['stages']) == {'stage2-unfrozen'} and m['stages']['stage2-unfrozen']['lr'] == m['config']['lr']
    assert 'Trained from scratch' in (run/'report.md').read_text()
    op = m['operating_threshold']
    assert (m['threshold'], m['threshold_source']) == (op['value'], op['source']) and 0 < m['calibration']['temperature']
    # the run says which data and which precision it used
    assert 'built-in synthetic PCam' in res.stdout
    if not torch.cuda.is_available(): assert 'precision: fp32 on the CPU: mixed precision, the default, is for CUDA GPUs' in res.stdout
    assert m['compute_precision'].startswith('fp32' if not torch.cuda.is_available() else 'fp16')


def test_model_pth_is_a_plain_state_dict(demo_run):
    run, _, _ = demo_run
    sd = torch.load(run/'model.pth', weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert len(sd) > 100 and sd['0.model.stem.conv.weight'].shape == (32, 3, 3, 3)  # timm's regnetx_002 body plus fastai's head


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
    pooled = centre_ratio(cams.mean(0, keepdim=True))[0]  # the average map over all positives
    print('pooled ratio', float(pooled))
    assert ratios.median() > 1 and pooled > 1
    raw = gradcam(learn, xb, normalize=False)
    assert (raw >= 0).all()


def test_same_config_is_skipped(demo_run):
    run, data, _ = demo_run
    import time
    from conftest import run_cli
    t0 = time.time()
    res = run_cli(['train'], env={'PCAM_FASTAI_HOME': str(data.parent)}, cwd=run.parent.parent)
    assert res.returncode == 0 and 'already holds a finished run of this configuration' in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert time.time() - t0 < 60


def test_report_folder(demo_run):
    run, _, _ = demo_run
    cfg = json.loads((run/'config.json').read_text())
    for k in ('seed', 'versions', 'device', 'precision', 'data', 'labels_sha1', 'split', 'settings', 'key'): assert k in cfg, k
    report = (run/'report.md').read_text()
    assert 'optimistic' in report and '95 % CI' in report
    import re
    for img in re.findall(r'!\[[^\]]*\]\(([^)]+)\)', report): assert (run/img).exists(), img
    m = json.loads((run/'metrics.json').read_text())
    for k in ('accuracy', 'roc_auc', 'sensitivity', 'specificity', 'precision', 'f1', 'tp', 'fp', 'tn', 'fn', 'threshold', 'ci95', 'split'):
        assert k in m, k
    for k in ('accuracy', 'roc_auc', 'sensitivity', 'specificity', 'precision', 'f1', 'threshold'): assert isinstance(m[k], float), (k, m[k])
    assert m['compute_precision'].startswith(('fp32', 'fp16'))


def test_submission_round_trip(demo_run, tmp_path):
    from conftest import run_cli
    run, data, _ = demo_run
    res = run_cli(['submit', '--run-dir', run, '--out', tmp_path/'sub.csv'])
    assert res.returncode == 0, res.stderr[-3000:]
    sub = pd.read_csv(tmp_path/'sub.csv', dtype={'id': str})
    sample = pd.read_csv(data/'sample_submission.csv', dtype={'id': str})
    assert list(sub.columns) == ['id', 'label'] and list(sub.id) == list(sample.id) and sub.label.between(0, 1).all()
    # a corrupt model file: a clear error, no file written
    bad = tmp_path/'bad_run'; bad.mkdir()
    (bad/'config.json').write_text((run/'config.json').read_text())
    (bad/'model.pth').write_bytes((run/'model.pth').read_bytes()[:4096])
    res = run_cli(['submit', '--run-dir', bad, '--out', tmp_path/'bad.csv'])
    assert res.returncode == 2 and 'not a readable PyTorch weights file' in res.stderr and 'Traceback' not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path/'bad.csv').exists()


# the frozen-then-unfrozen recipe (the card's), small: resnet18 from a local weights file
FAST = ['--preset', 'cpu-demo', '--arch', 'resnet18', '--n-items', '160', '--size', '64', '--lr-frozen', '1e-3', '--lr-unfrozen', '1e-3', '--num-workers', '0']


def test_same_seed_same_numbers(demo_run, tmp_path, resnet18_weights):
    from conftest import run_cli
    _, data, _ = demo_run
    ms = []
    for r in ('a', 'b'):
        res = run_cli(['train', '--data', data, '--run-dir', tmp_path/r, '--epochs-frozen', '1', '--epochs-unfrozen', '1', *FAST, '--weights-path', resnet18_weights])
        assert res.returncode == 0, res.stderr[-3000:]
        ms.append(json.loads((tmp_path/r/'metrics.json').read_text()))
    for k in ('accuracy', 'roc_auc', 'sensitivity', 'specificity', 'tp', 'fp', 'tn', 'fn'): assert ms[0][k] == ms[1][k], k
    assert pd.read_csv(tmp_path/'a'/'history.csv').train_loss.tolist() == pd.read_csv(tmp_path/'b'/'history.csv').train_loss.tolist()


def test_killed_training_resumes(demo_run, tmp_path, resnet18_weights):
    import signal, time
    from conftest import BIN
    _, data, _ = demo_run
    args = [str(BIN/'pcam-fastai'), 'train', '--data', str(data), '--run-dir', str(tmp_path/'run'), '--epochs-frozen', '1', '--epochs-unfrozen', '4', *FAST, '--weights-path', str(resnet18_weights)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    prog, deadline = tmp_path/'run'/'progress.json', time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            st = json.loads(prog.read_text())
            if st.get('stage') == 'stage2-unfrozen' and st.get('epochs_done', 0) >= 1: break
        except (OSError, ValueError): pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL); proc.wait()
    st = json.loads(prog.read_text())
    assert st['stage'] == 'stage2-unfrozen' and 1 <= st['epochs_done'] < 4, st
    assert not (tmp_path/'run'/'metrics.json').exists()
    models = tmp_path/'run'/'models'
    assert sorted(f.name for f in models.glob('*-last.pth')) == ['stage2-unfrozen-last.pth']  # stage 1's went when it finished
    res = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming stage2-unfrozen after epoch {st['epochs_done']}/4" in res.stdout
    hist = pd.read_csv(tmp_path/'run'/'history.csv').drop_duplicates(['stage', 'epoch'], keep='last')
    assert list(zip(hist.stage, hist.epoch)) == [('stage1-frozen', 0)] + [('stage2-unfrozen', e) for e in range(4)]
    m = json.loads((tmp_path/'run'/'metrics.json').read_text())
    assert m['stages']['stage2-unfrozen']['resumed_at'] == st['epochs_done']
    assert sorted(f.name for f in models.glob('*.pth')) == ['stage1-frozen.pth', 'stage2-unfrozen.pth']
