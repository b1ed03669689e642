"""The GA multi-view CNN and the 3D classifier, with WBP through them."""

from __future__ import annotations

import pytest
import torch

from ppi_med.networks import BACKBONES, MVCNN, backbone_segments, make_backbone, make_classifier_3d
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


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("classes", [None, 3], ids=["features", "classifier"])
def test_backbone_segments_in_order_are_the_backbones_forward(name, classes):
    torch.manual_seed(0)
    net, _ = make_backbone(name, 2, 1, width=4, out_classes=classes)
    net.eval()
    segments, tail = backbone_segments(net)
    assert len(segments) > 2 and all(segments)
    x = torch.rand(2, 1, 32, 32)
    h = x
    for modules in segments:
        for m in modules:
            h = m(h)
    torch.testing.assert_close(tail(h), net(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="Linear"):
        backbone_segments(torch.nn.Linear(2, 2))


def _twins(backbone: str) -> tuple[MVCNN, MVCNN]:
    torch.manual_seed(0)
    plain = MVCNN(backbone=backbone, width=4).double().train()
    torch.manual_seed(0)
    ckpt = MVCNN(backbone=backbone, width=4, checkpoint="true").double().train()  # a bundle override's string
    return plain, ckpt


@pytest.mark.parametrize("backbone", ["resnet10", "densenet"])
def test_checkpointed_mvcnn_gives_the_same_step_and_running_statistics(backbone):
    plain, ckpt = _twins(backbone)
    assert ckpt.checkpoint and not plain.checkpoint
    x = torch.rand(3, 1, 4, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    grads = []
    for net in (plain, ckpt):
        torch.manual_seed(1)  # the head's dropout
        loss = torch.nn.functional.cross_entropy(net(x), y)
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    for g, h in zip(*grads):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    # one training forward's update of the running statistics, not a second one from the recomputation
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, c), name
    # without gradients there is nothing to recompute: the backbone runs as it is
    with torch.no_grad():
        torch.testing.assert_close(ckpt.eval()(x), plain.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("create_graph", [False, True])
def test_checkpointed_mvcnn_keeps_wbp_and_its_second_derivative(create_graph):
    # WBP's hooks are gone by the time the saliency's backward recomputes a segment: they are replayed
    plain, ckpt = _twins("resnet10")
    x = torch.rand(2, 1, 3, 32, 32, dtype=torch.float64)
    maps = []
    for net in (plain, ckpt):
        torch.manual_seed(1)  # the head's dropout
        maps.append(wbp(net, x, torch.tensor([1, 0]), create_graph=create_graph))
    torch.testing.assert_close(maps[1], maps[0], rtol=1e-10, atol=1e-12)
    assert maps[0].abs().sum() > 0
    if create_graph:
        params = [list(net.backbone.parameters()) for net in (plain, ckpt)]
        g0 = torch.autograd.grad(maps[0].abs().sum(), params[0])
        g1 = torch.autograd.grad(maps[1].abs().sum(), params[1])
        for g, h in zip(g0, g1):
            torch.testing.assert_close(h, g, rtol=1e-8, atol=1e-10)


def test_checkpoint_switch_is_checked_and_the_bundle_can_set_it():
    with pytest.raises(ValueError, match="MVCNN checkpoint must be true or false"):
        MVCNN(width=4, checkpoint="sometimes")
    from pipelines.bundle_config import open_config

    parser = open_config("bundles/ga_ppi.json", {"network_def#checkpoint": True})
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, MVCNN) and net.checkpoint
