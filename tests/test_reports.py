"The run report and its parts: the ECE's interval and noise floor, counts that agree, the threshold said once, stage names, the precision line, Grad-CAM of missed tumour, plot labels"
import copy, functools

import numpy as np
import pytest
import torch
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pandas as pd

from pcam_fastai.metrics import binary_metrics, expected_calibration_error, ece_interval
from pcam_fastai.plots import plot_reliability
from pcam_fastai.report import write_report, headline, threshold_text, stage_label, RESEARCH_USE

FALLBACK = '0.5 (fallback: validation separates the classes perfectly)'


def calibrated(seed=1, n=300):
    "Perfectly calibrated predictions (each label drawn with its probability): the true ECE is 0"
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, n)
    return p, (rng.uniform(0, 1, n) < p).astype(int)


@functools.lru_cache(None)
def _valid_metrics():
    p, t = calibrated()
    return binary_metrics(p, t, threshold=0.5, threshold_source=FALLBACK, split='kaggle-random-80/20 (optimistic: ...)', n_boot=200)


def fake_metrics(tp=98, n_cam=64, stages=('stage2-unfrozen',), with_of=True):
    "metrics.json of a made-up run: real `binary_metrics` numbers, a fallback threshold, a Grad-CAM count below the true positives"
    m = copy.deepcopy(_valid_metrics())
    cs = dict(n=n_cam, mean=0.3, median=0.3, area_share=1 / 9, layer='body.6', grid=6) | (dict(of=tp) if with_of else {})
    m.update(tp=tp, n_valid=m['n'], test=None, data='/data/pcam', synthetic=False, finished='2026-01-01T00:00:00+00:00', device='cpu',
             compute_precision='fp32', seconds=12.0, seed=42, optimistic=True, classes=['normal', 'tumour'], config=dict(pretrained=False),
             operating_threshold=dict(value=0.5, source=FALLBACK, chosen_on='kaggle-random-80/20', rule='...'),
             calibration=dict(temperature=1.2, bias=[0.0, 0.1], valid_before=dict(nll=0.4, ece=0.08), valid_after=dict(nll=0.3, ece=m['ece'])),
             stages={s: dict(epochs=3, lr=1e-2, seconds=5.0) for s in stages}, plots=[], versions=dict(pcam_fastai='0'), gradcam_centre_share=cs)
    return m


def report(tmp_path, **kw):
    return write_report(tmp_path, fake_metrics(**kw), dict(settings={})).read_text()


def test_ece_interval_holds_its_estimate():
    "Where the percentile interval lies wholly above the measured ECE, the new interval holds its (bias-corrected) estimate, and 0, the truth"
    p, t = calibrated()
    idx = np.random.default_rng(0).integers(0, len(t), (1000, len(t)))
    q_lo, q_hi = np.percentile([expected_calibration_error(p[i], t[i]) for i in idx], [2.5, 97.5])
    e = ece_interval(p, t)
    assert e['ece'] < q_lo  # the old interval excluded its estimate
    lo, hi = e['ci95']
    assert lo == 0 <= lo <= e['ece_debiased'] <= hi
    assert e['ece'] == pytest.approx(0.0483, abs=1e-4) and e['ece_debiased'] < e['ece']
    assert e['ece'] < e['ece_floor_hi']  # what a perfectly calibrated model can score on 300 patches
    m = binary_metrics(p, t, n_boot=200)
    assert m['ci95']['ece'][0] <= m['ece_debiased'] <= m['ci95']['ece'][1]
    assert {'ece_floor', 'ece_floor_hi'} <= set(m) and m['ece_floor'] < m['ece_floor_hi']


def test_ece_interval_leaves_zero_when_miscalibrated():
    p, t = calibrated()
    e = ece_interval(np.clip(0.5 + 1.8 * (p - 0.5), 0, 1), t)  # overconfident
    assert e['ece'] > e['ece_floor_hi'] and 0 < e['ci95'][0] <= e['ece_debiased'] <= e['ci95'][1]


def test_report_ece_row_and_noise_floor(tmp_path):
    md = report(tmp_path)
    row = next(l for l in md.splitlines() if l.startswith('| ECE, 15 bins (calibrated), bias-corrected'))
    value, ci = [c.strip() for c in row.split('|')[2:4]]
    lo, hi = map(float, ci.split(' - '))
    assert lo <= float(value) <= hi
    m = fake_metrics()
    assert f"{m['ece']:.4f}; floor {m['ece_floor']:.4f}, {m['ece_floor_hi']:.4f}" in md
    assert 'noise floor' in md and f"would score {m['ece_floor']:.4f} on average" in md


def test_report_research_use_only(tmp_path):
    assert 'For research use only; not for clinical diagnosis.' in report(tmp_path).splitlines()
    assert RESEARCH_USE == 'For research use only; not for clinical diagnosis.'


def test_report_gradcam_count_agrees_with_confusion(tmp_path):
    md = report(tmp_path)
    assert '| confusion (tp / fp / tn / fn) | 98 /' in md
    assert 'On 64 of the 98 correctly found tumour patches' in md
    assert 'On all 98 correctly found' in report(tmp_path, n_cam=98)
    assert 'On 64 of the 98 correctly found' in report(tmp_path, with_of=False)  # a run from before: the confusion table's tp


def test_threshold_said_once(tmp_path):
    md = report(tmp_path)
    assert '(0.5 (' not in md
    assert '| threshold | 0.5 (fallback: validation separates the classes perfectly) | |' in md
    assert '**0.5** (fallback: validation separates the classes perfectly; chosen on' in md
    assert threshold_text(0.5, FALLBACK) == FALLBACK and threshold_text(0.4123, "Youden's J on validation") == "0.412 (Youden's J on validation)"
    assert '>= 0.5 (fallback: validation separates the classes perfectly); calibration' in headline(fake_metrics())


def test_single_stage_is_not_called_stage2(tmp_path):
    md = report(tmp_path)
    assert '| 1 of 1: whole network | 3 |' in md and 'stage2-unfrozen' not in md
    md2 = report(tmp_path, stages=('stage1-frozen', 'stage2-unfrozen'))
    assert '| 1 of 2: body frozen (head only) |' in md2 and '| 2 of 2: whole network |' in md2
    assert stage_label('stage3-extra', ['stage3-extra']) == '1 of 1: stage3-extra'


def test_settings_line_says_what_runs():
    from pcam_fastai.train import settings_line
    from pcam_fastai.settings import PRESETS
    cpu = settings_line('cpu-demo', PRESETS['cpu-demo'], cuda=False)
    assert 'fp16=True' not in cpu and 'fp16=False (fp32: fp16 needs a CUDA GPU)' in cpu
    assert 'fp16=True' in settings_line('card', PRESETS['card'], cuda=True)
    assert PRESETS['cpu-demo']['fp16'] is True  # the setting (and the run's key) is unchanged


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "An untrained resnet18 on 40 synthetic 32 px patches, and its interpretation"
    from pcam_fastai.data import make_synthetic_pcam
    from pcam_fastai.sources import pcam_dataloaders
    from pcam_fastai.learner import pcam_learner
    from fastai.interpret import ClassificationInterpretation
    dls = pcam_dataloaders(make_synthetic_pcam(tmp_path_factory.mktemp('tiny')/'pcam', n_train=40, n_test=2, seed=1), size=32, bs=8, num_workers=0)
    learn = pcam_learner(dls, 'resnet18', pretrained=False, fp16=False, quiet=True)
    return learn, ClassificationInterpretation.from_learner(learn)


@pytest.mark.parametrize('kind', ['fn', 'fp'])
def test_misclassified_maps_explain_tumour(tiny, kind, monkeypatch):
    "False negatives (and the other top-loss plots of a two-class task) show the Grad-CAM of tumour, and say so in the title"
    import pcam_fastai.interpret as I
    learn, interp = tiny
    seen, real = [], I.gradcam
    monkeypatch.setattr(I, 'gradcam', lambda learn, xb, target=None, **kw: seen.append(torch.as_tensor(target).flatten().tolist()) or real(learn, xb, target, **kw))
    thr = 1.0 if kind == 'fn' else 0.0  # nothing reaches p = 1: every tumour patch is missed; at 0 every normal patch is a false alarm
    fig = I.plot_top_losses_gradcam(learn, k=2, interp=interp, kind=kind, threshold=thr)
    assert seen == [[1]], seen
    assert 'Grad-CAM of tumour' in fig._suptitle.get_text().replace('\n', ' ')
    plt.close(fig)
    seen.clear()
    fig = I.plot_top_losses_gradcam(learn, k=2, interp=interp, kind=kind, threshold=thr, positive_cam=False)
    assert seen and seen[0] != [1] and 'Grad-CAM of the predicted label' in fig._suptitle.get_text().replace('\n', ' ')
    plt.close(fig)


def test_gallery_loss_has_no_minus_zero():
    from pcam_fastai.interpret import loss_text
    assert loss_text(torch.tensor(-0.0)) == '0.00' and loss_text(-1e-9) == '0.00' and loss_text(0.456) == '0.46'


def test_history_plot_whole_epochs_and_names():
    from pcam_fastai.training import plot_history
    h = pd.DataFrame(dict(stage=['stage2-unfrozen'] * 3, epoch=[0, 1, 2], train_loss=[0.7, 0.5, 0.4], valid_loss=[0.6, 0.5, 0.45],
                          accuracy=[0.6, 0.7, 0.8], roc_auc_score=[0.7, 0.8, 0.9], time=['00:01'] * 3))
    fig = plot_history(h); fig.canvas.draw()
    for ax in fig.axes: assert all(float(x).is_integer() for x in ax.get_xticks()), ax.get_xticks()
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ['accuracy', 'ROC AUC']
    plt.close(fig)


def test_reliability_plot_labels_and_bars():
    p = np.r_[np.random.default_rng(2).uniform(0, 0.3, 400), 0.999]; t = (p > 0.5).astype(int)  # one patch near p = 1
    fig = plot_reliability({'before': p, 'after': p}, t, 'Reliability, validation', 'calibration fitted on this split: kaggle-random-80/20')
    fig.canvas.draw()
    ax, axh = fig.axes
    assert not any(l.endswith('-') for l in ax.get_title().splitlines()), ax.get_title()
    assert 'kaggle-random-80/20' in ax.get_title().splitlines()[-1]
    assert axh.get_ylim()[0] < 1  # the lone patch at p = 1 is a bar with a height on the log axis
    assert not [l.get_text() for l in axh.get_yticklabels(minor=True) if l.get_text()]
    plt.close(fig)
