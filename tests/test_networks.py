"""The GA multi-view CNN and the 3D classifier, with WBP through them."""

from __future__ import annotations

import pytest
import torch

from ppi_med.networks import MVCNN, make_classifier_3d
from ppi_med.saliency import compute, wbp


@pytest.mark.parametrize("backbone,feature_pool", [("resnet10", "max"), ("resnet10", "avg"), ("densenet", "avg")])
def test_mvcnn_wbp_is_a_volume_equal_to_input_times_gradient(backbone, feature_pool):
    torch.manual_seed(0)
    net = MVCNN(backbone=backbone, width=4, feature_pool=feature_pool).eval()
    x = torch.rand(2, 1, 4, 32, 48)
    target = torch.tensor([1, 0])
    s = wbp(net, x, target)
    assert s.shape == x.shape
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xg).gather(1, target[:, None]).sum(), xg)
    # a ReLU network in eval mode: WBP is exactly input x gradient
    torch.testing.assert_close(s, g * x, rtol=1e-4, atol=1e-6)
    assert s.abs().sum() > 0


@pytest.mark.parametrize("view_pool", ["max", "mean"])
def test_mvcnn_is_invariant_to_the_order_of_views(view_pool):
    torch.manual_seed(0)
    net = MVCNN(width=4, view_pool=view_pool).eval()
    x = torch.rand(2, 1, 5, 32, 48)
    shuffled = x[:, :, torch.tensor([3, 0, 4, 1, 2])]
    torch.testing.assert_close(net(shuffled), net(x), rtol=1e-5, atol=1e-6)
    # but not to the content of a view
    assert not torch.allclose(net(x.flip(-1)), net(x))
    with pytest.raises(ValueError, match=r"\(N, C, V, H, W\)"):
        net(torch.rand(1, 1, 32, 48))


def test_gradcam_through_mvcnn_regroups_views():
    net = MVCNN(width=4).eval()
    x = torch.rand(2, 1, 4, 32, 48)
    cam = compute("gradcam", net, x, 1)
    assert cam.shape == x.shape and (cam >= 0).all()


def test_classifier_3d_wbp_in_training_mode_keeps_the_model():
    torch.manual_seed(0)
    net = make_classifier_3d("resnet10", width=4).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s = wbp(net, torch.rand(2, 1, 16, 16, 16), 1)
    assert s.shape == (2, 1, 16, 16, 16) and torch.isfinite(s).all()
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pool"):
        MVCNN(width=4, feature_pool="median")
    with pytest.raises(ValueError, match="view_pool"):
        MVCNN(width=4, view_pool="median")
