"Foundation models (no hub weights here: ViT-Tiny/16 with random weights, saved to a file so that the file-loading path is real): the embedding cache equals the model's forward pass and resumes after a kill, the probe leaves the backbone unchanged and reports mean ± sd over seeds, missing and gated models get a clear message, and `compare` puts runs beside the published anchors."
import json, re, subprocess, sys, textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli, run_main, clean_error

FIXTURE = ROOT/'tests'/'data'/'real-pcam-100'
ARCH = 'vit_tiny_patch16_224'


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "The fixture's 100 real tiles as an array cache, and a ViT-Tiny weights file"
    from pcam_fastai.cache import build_cache
    from pcam_fastai.foundation import create_backbone
    tmp = tmp_path_factory.mktemp('foundation')
    cache = build_cache(FIXTURE, tmp/'cache', show_progress=False)
    torch.manual_seed(0)
    torch.save(create_backbone(ARCH, pretrained=False).state_dict(), tmp/'vit_tiny.pth')
    return tmp, cache, tmp/'vit_tiny.pth'


KILLED = """
import os, signal, sys
from pcam_fastai.foundation import create_backbone, embedding_cache
cache, weights, dest = sys.argv[1:4]
model = create_backbone('vit_tiny_patch16_224', weights_path=weights)
calls = []
def kill_on_fourth(module, args):
    calls.append(1)
    if len(calls) == 4: os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no exception handler
model.patch_embed.register_forward_pre_hook(kill_on_fourth)  # embed_patches calls forward_features, which passes here
embedding_cache(cache, model, dest, bs=8, show_progress=False)
"""


def test_embedding_cache_equals_the_forward_pass_and_resumes_after_a_kill(setup, capsys):
    from pcam_fastai.cache import load_cache
    from pcam_fastai.foundation import create_backbone, embed_patches, embedding_cache
    tmp, cache, weights = setup
    dest = tmp/'emb-killed'
    res = subprocess.run([sys.executable, '-c', textwrap.dedent(KILLED), str(cache), str(weights), str(dest)], capture_output=True, text=True, timeout=600)
    assert res.returncode == -9, (res.returncode, res.stderr[-2000:])
    assert json.loads((dest/'train.progress.json').read_text())['done'] == 24  # three batches of 8 written before the kill
    assert not (dest/'train.npy').exists() and (dest/'train.partial.npy').exists()
    model = create_backbone(ARCH, weights_path=weights)
    embedding_cache(cache, model, dest, bs=8)
    assert 'resuming at patch 24 of 100' in capsys.readouterr().out
    meta = json.loads((dest/'meta.json').read_text())
    assert meta['splits']['train']['resumed_at'] == 24 and meta['backbone']['weights'].startswith('file vit_tiny.pth (sha256 ')  # the file, its SHA-256 and how its names matched
    got = np.load(dest/'train.npy')
    ref = torch.cat([embed_patches(model, load_cache(cache).images[i:i + 32]) for i in range(0, 100, 32)]).numpy()
    assert got.shape == (100, 192) and np.abs(got - ref).max() <= 1e-5, np.abs(got - ref).max()
    assert not (dest/'train.partial.npy').exists() and not (dest/'train.progress.json').exists()
    # force=True starts again from zero: a crash before its first batch must not leave the old progress vouching for the fresh zeros
    model2 = create_backbone(ARCH, weights_path=weights)
    h = model2.patch_embed.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(MemoryError('out of memory')))
    with pytest.raises(MemoryError): embedding_cache(cache, model2, dest, bs=8, force=True, show_progress=False)
    assert not (dest/'train.progress.json').exists()
    h.remove()


def test_probe_leaves_the_backbone_unchanged_and_reports_mean_and_sd(setup):
    from pcam_fastai.foundation import create_backbone, state_checksum
    tmp, cache, weights = setup
    before = state_checksum(create_backbone(ARCH, weights_path=weights))
    res = run_main(['probe', '--backbone', ARCH, '--weights-path', weights, '--data', cache, '--out', tmp/'probe', '--n-runs', '3',
                    '--max-steps', '300', '--bs', '32', '--device', 'cpu'])
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp/'probe'/'probe.json').read_text())
    assert r['backbone_sha1_before'] == r['backbone_sha1_after'] == before
    assert r['n_runs'] == 3 and [x['seed'] for x in r['runs']] == [0, 1, 2]
    bacc = [x['test']['balanced_accuracy'] for x in r['runs']]
    assert r['summary']['balanced_accuracy']['mean'] == pytest.approx(np.mean(bacc))
    assert r['summary']['balanced_accuracy']['sd'] == pytest.approx(np.std(bacc, ddof=1))
    assert all('ci95' in x['test'] for x in r['runs']) and r['split'] == 'kaggle-random-60/20/20' and r['optimistic']
    assert '± ' in res.stdout and '| balanced accuracy |' in (tmp/'probe'/'probe.md').read_text()
    assert state_checksum(create_backbone(ARCH, weights_path=weights)) == before


@pytest.mark.parametrize('name,page', [('uni', 'https://huggingface.co/MahmoodLab/UNI'),
                                       ('hf-hub:nobody-here/no-such-model', 'https://huggingface.co/nobody-here/no-such-model')])
def test_a_gated_or_missing_model_names_its_page_and_weights_path(setup, name, page):
    _, cache, _ = setup
    res = run_cli(['probe', '--backbone', name, '--data', cache], env={'HF_HUB_OFFLINE': '1'}, timeout=300)
    err = clean_error(res)
    assert page in err and '--weights-path' in err
    if name == 'uni': assert 'accept its licence' in err and 'pcam_fastai never does' in err


def test_bad_backbones_and_files_are_clear_errors(setup, tmp_path):
    _, cache, weights = setup
    (tmp_path/'notes.pth').write_text('not weights')
    for args, message in [(['--backbone', 'phikon'], 'transformers model, not a timm one'),
                          (['--backbone', 'vit_tiny_patch16_244'], 'did you mean vit_tiny_patch16_224'),
                          (['--backbone', 'vit_small_patch16_224', '--weights-path', weights], 'does not fit vit_small_patch16_224'),
                          (['--backbone', ARCH, '--weights-path', tmp_path/'notes.pth'], 'is not a readable weights file'),
                          (['--backbone', ARCH, '--no-pretrained', '--data', tmp_path], 'is not an array cache')]:
        args = args if '--data' in args else [*args, '--data', cache]
        assert message in clean_error(run_main(['probe', *args])), args


@pytest.mark.slow  # the README's demo run (shared with other tests)
def test_compare_puts_runs_beside_the_anchors(setup, demo_run, tmp_path):
    tmp, cache, weights = setup
    if not (tmp/'probe'/'probe.json').exists():
        assert run_main(['probe', '--backbone', ARCH, '--weights-path', weights, '--data', cache, '--out', tmp/'probe', '--n-runs', '2',
                         '--max-steps', '100', '--bs', '32']).returncode == 0
    res = run_main(['compare', demo_run[0], tmp/'probe', '--out', tmp_path/'table'])
    assert res.returncode == 0, res.stderr
    import pandas as pd
    t = pd.read_csv(tmp_path/'table.csv')
    assert t.kind.tolist()[:2] == ['fine-tuned', 'linear probe'] and (t.kind == 'linear probe, published').sum() >= 8
    md = (tmp_path/'table.md').read_text()
    assert '*P4M-DenseNet* (Veeling et al. 2018)' in md and 'not run here' in md and '± ' in md and '(optimistic)' in md
    assert 'neither a training run' in clean_error(run_main(['compare', tmp_path]))


def test_vit_gradcam_agrees_with_pytorch_grad_cam():
    "Grad-CAM on a ViT's patch tokens against pytorch-grad-cam with the usual reshape_transform, on the same model and layer (random weights)"
    gc = pytest.importorskip('pytorch_grad_cam', reason='pytorch-grad-cam is not installed (pip install grad-cam; it is in the dev extra)')
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pcam_fastai.interpret import gradcam, gradcam_layer
    from pcam_fastai.learner import pcam_learner, token_backbone
    from pcam_fastai.loader import cache_dataloaders
    from pcam_fastai.cache import build_cache
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        cache = build_cache(FIXTURE, Path(d)/'cache', show_progress=False)
        dls = cache_dataloaders(cache, size=96, bs=8, device='cpu')
        torch.manual_seed(0)
        learn = pcam_learner(dls, ARCH, pretrained=False, quiet=True)
        xb = dls.valid.one_batch()[0].as_subclass(torch.Tensor)
    vit = token_backbone(learn.model)
    layer, name, cells = gradcam_layer(learn.model, xb)
    assert layer is vit.blocks[-1].norm1 and cells == 6  # the patch grid: 96 px / 16 px
    ours = gradcam(learn, xb, target=1).numpy()

    def reshape(t):  # pytorch-grad-cam's documented ViT reshape_transform
        g = t[:, vit.num_prefix_tokens:].reshape(t.size(0), 6, 6, t.size(2))
        return g.transpose(2, 3).transpose(1, 2)
    model = learn.model.eval()
    with gc.GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        ref = cam(input_tensor=xb, targets=[ClassifierOutputTarget(1)] * len(xb))
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, ref) if a.std() > 0 and b.std() > 0]
    print(f"\nViT Grad-CAM vs pytorch-grad-cam: correlation min {min(corr):.5f}, mean {np.mean(corr):.5f} over {len(corr)} patches")
    assert len(corr) >= 4 and min(corr) >= 0.99, corr


@pytest.mark.slow  # trains a ViT for two short epochs
def test_vit_trains_with_the_card_recipe_reports_and_exports(tmp_path):
    "train_pcam with a ViT: frozen then unfrozen on three layer groups, Grad-CAM in the report, an ONNX bundle that predicts like the learner"
    from pcam_fastai.cache import build_cache, load_cache
    from pcam_fastai.train import train_pcam
    from pcam_fastai.bundling import export_bundle
    from pcam_fastai.export import load_bundle
    from pcam_fastai.runs import load_run
    from pcam_fastai.evaluate import predict
    from pcam_fastai.foundation import create_backbone
    cache = build_cache(FIXTURE, tmp_path/'cache', show_progress=False)
    torch.manual_seed(0)  # "pretrained" weights from a local file (no hub here): the frozen stage runs, then the unfrozen one
    from safetensors.torch import save_file
    save_file(create_backbone(ARCH, pretrained=False).state_dict(), str(tmp_path/'vit_tiny.safetensors'))
    learn, m = train_pcam(cache, run_dir=tmp_path/'run', preset='cpu-demo', arch=ARCH, weights_path=tmp_path/'vit_tiny.safetensors', size=48,
                          epochs_frozen=1, epochs_unfrozen=1, lr_find_iters=5, num_workers=0, top_k=4)
    assert len(learn.opt.param_groups) == 3  # vit_splitter: early blocks, late blocks, head
    lrs = [g['lr'] for g in learn.opt.param_groups]
    assert lrs[0] < lrs[1] < lrs[2], lrs  # discriminative learning rates
    assert (tmp_path/'run'/'report.md').exists() and m.get('gradcam_centre_share') is not None
    half = [[0.5] * 3, [0.5] * 3]  # timm's ViT-Tiny was pretrained with 0.5 / 0.5, not ImageNet's statistics
    assert learn.input_stats == half and json.loads((tmp_path/'run'/'config.json').read_text())['input_stats'] == half
    dest = export_bundle(tmp_path/'run', bench_patches=0)
    assert json.loads((dest/'bundle.json').read_text())['input_stats'] == half
    x = np.ascontiguousarray(load_cache(cache).images[:16])
    p_onnx, p_torch = load_bundle(dest, backend='onnx', device='cpu').predict(x), load_bundle(dest, backend='torch', device='cpu').predict(x)
    assert np.abs(p_onnx - p_torch).max() <= 1e-4
    learn = load_run(tmp_path/'run')
    p_learn = predict(learn, learn.dls.test_dl(x))[0].numpy()  # the cache's loader on the same uint8 patches
    assert np.abs(p_torch - p_learn).max() <= 1e-4


def test_integer_weights_and_a_constant_backbone_are_refused(setup, tmp_path):
    "An int8 file with the right names and shapes is refused naming its tensors; all-zero or NaN weights stop at the first batch, not at a probe of 0.5"
    from safetensors.torch import save_file
    _, cache, weights = setup
    sd = torch.load(weights, weights_only=True)
    save_file({k: (v * 100).to(torch.int8) if v.is_floating_point() else v for k, v in sd.items()}, str(tmp_path/'int8.safetensors'))
    save_file({k: torch.zeros_like(v) for k, v in sd.items()}, str(tmp_path/'zeros.safetensors'))
    save_file({**sd, 'norm.weight': torch.full_like(sd['norm.weight'], float('nan'))}, str(tmp_path/'nan.safetensors'))
    for name, message in [('int8', f"int8.safetensors holds integer or bool tensors where {ARCH} has floating-point ones"),
                          ('zeros', 'gives the same embedding to all 64 patches of the first batch (train, patches 0-63)'),
                          ('nan', 'gives non-finite embeddings (NaN or inf)')]:
        err = clean_error(run_main(['probe', '--backbone', ARCH, '--weights-path', tmp_path/f'{name}.safetensors', '--data', cache, '--out', tmp_path/name,
                                    '--n-runs', '1', '--max-steps', '20', '--bs', '32', '--device', 'cpu']))
        assert message in err, (name, err)
        assert not (tmp_path/name/'probe.json').exists()
        if name == 'int8':  # a few tensors named, with their dtype
            assert re.search(r'\(\d+ of \d+: [\w.]+ int8, [\w.]+ int8, [\w.]+ int8 and \d+ more\)', err) and 'pass the floating-point weights' in err, err


def test_probe_on_a_pcam_folder_suggests_a_new_cache_folder(tmp_path):
    "`probe --data KAGGLE_FOLDER` names `pcam-fastai cache FOLDER FOLDER-cache`, never the user's data folder as the cache's destination"
    err = clean_error(run_main(['probe', '--backbone', ARCH, '--no-pretrained', '--data', FIXTURE]))
    assert f'pcam-fastai cache {FIXTURE} {FIXTURE}-cache, then pass --data {FIXTURE}-cache' in err, err
    assert f'cache SRC {FIXTURE}' not in err
    err = clean_error(run_main(['probe', '--backbone', ARCH, '--no-pretrained', '--data', tmp_path/'new']))  # a folder that does not exist yet may be the cache
    assert f'pcam-fastai cache SRC {tmp_path/"new"}' in err


GOOD_PROBE = dict(backbone=dict(name='vit-tiny'), split='kaggle-random-60/20/20', n_test=20, n_runs=2, optimistic=True,
                  summary={m: dict(mean=0.8, sd=0.01) for m in ('balanced_accuracy', 'roc_auc', 'accuracy', 'nll', 'ece', 'sensitivity', 'specificity')})


@pytest.mark.parametrize('name,content,message', [
    ('probe.json', '{"summary": ', 'probe.json is not valid JSON'),
    ('probe.json', [GOOD_PROBE], 'probe.json holds a JSON list, not an object'),
    ('probe.json', {k: v for k, v in GOOD_PROBE.items() if k != 'n_runs'}, 'probe.json has no n_runs'),
    ('probe.json', {**GOOD_PROBE, 'summary': {'accuracy': {'mean': 0.8, 'sd': 0.01}}}, 'probe.json has no summary.balanced_accuracy.mean'),
    ('probe.json', {**GOOD_PROBE, 'summary': {**GOOD_PROBE['summary'], 'roc_auc': {'mean': '0.91', 'sd': 0.01}}}, 'summary.roc_auc.mean is "0.91", not a number'),
    ('metrics.json', '\x00\x01', 'metrics.json is not valid JSON'),
    ('metrics.json', {'split': 'kaggle-random-80/20', 'accuracy': 'high'}, 'metrics.json: accuracy is "high", not a number'),
    ('metrics.json', {'split': 'kaggle-random-80/20', 'accuracy': 0.8, 'ci95': 'wide'}, 'metrics.json: ci95 is "wide", not an object'),
    ('metrics.json', {'loss': 0.3}, 'metrics.json holds none of balanced_accuracy, accuracy or roc_auc'),
])
def test_compare_names_a_damaged_run_file(tmp_path, name, content, message):
    "A run whose JSON is damaged, a list, incomplete or holds text for a number: one line naming the file and the problem, no traceback"
    (tmp_path/'run').mkdir()
    (tmp_path/'run'/name).write_text(content if isinstance(content, str) else json.dumps(content))
    GOOD = tmp_path/'good'; GOOD.mkdir(); (GOOD/'probe.json').write_text(json.dumps(GOOD_PROBE))
    err = clean_error(run_main(['compare', GOOD, tmp_path/'run']))
    assert message in err and str(tmp_path/'run'/name) in err, err
    assert len(err.strip().splitlines()) == 1


def test_compare_marks_a_random_split_optimistic_once(tmp_path):
    "A fine-tuned run's metrics.json records its split with its description; the table shows the short name and '(optimistic)' once"
    (tmp_path/'run').mkdir()
    (tmp_path/'run'/'metrics.json').write_text(json.dumps(dict(
        split='kaggle-random-80/20 (optimistic: patches of one slide fall on both sides)', n=20, balanced_accuracy=0.8, accuracy=0.8, roc_auc=0.9,
        nll=0.4, optimistic=True, ci95=dict(balanced_accuracy=[0.6, 0.95], roc_auc=[None, None]))))
    res = run_main(['compare', tmp_path/'run', '--no-anchors'])
    assert res.returncode == 0, res.stderr
    row = [l for l in res.stdout.splitlines() if l.startswith('| run |') and 'fine-tuned' in l][0]
    assert row.count('optimistic') == 1 and '| kaggle-random-80/20 (optimistic) | 0.8000 (0.600-0.950) |' in row, row


def test_a_registered_metric_reaches_binary_metrics_the_probe_and_compare(tmp_path):
    "One `register_metric` call: the metric is in binary_metrics' result (with its interval), the probe's summary over seeds, and compare's table"
    from pcam_fastai.metrics import binary_metrics, register_metric, unregister_metric, percentile_ci, summary_metrics
    from pcam_fastai.probe import linear_probe
    from pcam_fastai.compare import compare_runs, compare_markdown
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200); X = (rng.normal(0, 1, (200, 8)) + y[:, None]).astype(np.float32)
    emb = tmp_path/'emb'; emb.mkdir()  # an embeddings folder as embedding_cache writes it, without a backbone
    np.save(emb/'train.npy', X); np.save(emb/'train.labels.npy', y); np.save(emb/'train.keep.npy', np.ones(200, bool))
    b = dict(name='toy', timm='toy', weights='random', input_size=8, mean=[0.0] * 3, std=[1.0] * 3, pool='model', dim=8)
    (emb/'meta.json').write_text(json.dumps(dict(backbone=b, splits={'train': {}}, cache_splits={'train': {}})))
    register_metric('prevalence', lambda p, t, pred: float(t.mean()), 'share of tumour patches', fmt='.3f',
                    ci=lambda r: percentile_ci(r.t[r.idx].mean(1)))
    try:
        m = binary_metrics(rng.uniform(0, 1, 50), np.r_[np.ones(10), np.zeros(40)].astype(int), n_boot=50)
        assert m['prevalence'] == 0.2 and m['ci95']['prevalence'][0] <= 0.2 <= m['ci95']['prevalence'][1]
        res = linear_probe(emb, tmp_path/'probe', n_runs=2, max_steps=50, bs=32, device='cpu', show_progress=False)
        assert list(res['summary']) == list(summary_metrics()) and list(res['summary'])[-1] == 'prevalence'
        assert res['summary']['prevalence']['mean'] == pytest.approx(np.mean([r['test']['prevalence'] for r in res['runs']]))
        assert '| prevalence |' in (tmp_path/'probe'/'probe.md').read_text()
        table = compare_runs([tmp_path/'probe'], anchors=False)
        assert table.prevalence[0] == pytest.approx(res['summary']['prevalence']['mean'])
        assert compare_markdown(table).splitlines()[0].endswith('| NLL | share of tumour patches |')
    finally: unregister_metric('prevalence')
    assert 'prevalence' not in binary_metrics([0.2, 0.8], [0, 1], n_boot=0) and 'prevalence' not in summary_metrics()
