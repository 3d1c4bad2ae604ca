"Every backbone of the studies builds, trains a batch and gives a Grad-CAM map without naming a layer."
import pytest
import torch

from pcam_fastai.data import make_synthetic_pcam
from pcam_fastai.sources import pcam_dataloaders
from pcam_fastai.learner import pcam_learner, resolve_arch
from pcam_fastai.interpret import gradcam

pytestmark = pytest.mark.slow  # trains models, starts processes or builds pages: the fast loop skips these

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
    # A random model's map for one class can be empty (ReLU of a negative sum everywhere: about one seed in four
    # for mobilenet_v2). With the second logit made the negative of the first, the two maps are ReLU(S) and
    # ReLU(-S) of one weighted sum S, so at least one of them is non-empty unless Grad-CAM itself is broken.
    head = learn.model[1][-1]
    with torch.no_grad():
        head.weight[1] = -head.weight[0]
        if head.bias is not None: head.bias[1] = -head.bias[0]
    maps = [gradcam(learn, xb, target=t) for t in (0, 1)]
    for m in maps:
        assert m.shape == (len(xb), 64, 64) and torch.isfinite(m).all() and (m >= 0).all() and m.max() <= 1
    assert all(float(a.max() + b.max()) > 0 for a, b in zip(*maps)), 'both maps of an image were empty'


def test_unknown_arch_suggests():
    with pytest.raises(ValueError, match='did you mean densenet169'): resolve_arch('densenet196')
