"Every backbone of the studies builds, trains a batch and gives a Grad-CAM map without naming a layer."
import pytest
import torch

from pcam_fastai.data import make_synthetic_pcam, pcam_dataloaders
from pcam_fastai.learner import pcam_learner, resolve_arch
from pcam_fastai.interpret import gradcam

ARCHS = ['resnet50', 'vgg16_bn', 'mobilenet_v2', 'wide_resnet50_2', 'densenet169', 'convnext_atto']  # the last one is timm's


@pytest.fixture(scope='module')
def dls(tmp_path_factory):
    return pcam_dataloaders(make_synthetic_pcam(tmp_path_factory.mktemp('bb')/'pcam', n_train=24, n_test=2, seed=1),
                            size=64, bs=4, num_workers=0)


@pytest.mark.parametrize('arch', ARCHS)
def test_backbone_batch_and_gradcam(dls, arch, tmp_path):
    torch.manual_seed(0)
    learn = pcam_learner(dls, arch, pretrained=False, fp16=False, path=tmp_path, quiet=True)
    xb, yb = dls.one_batch()
    learn.model.train()
    loss = learn.loss_func(learn.model(xb), yb)
    loss.backward()  # one training batch: gradients reach the body
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learn.model[0].parameters())
    maps = [gradcam(learn, xb, target=t) for t in (0, 1)]
    for m in maps:
        assert m.shape == (len(xb), 64, 64) and torch.isfinite(m).all() and (m >= 0).all() and m.max() <= 1
    assert max(float(m.max()) for m in maps) > 0, 'every map was empty'


def test_unknown_arch_suggests():
    with pytest.raises(ValueError, match='did you mean densenet169'): resolve_arch('densenet196')
