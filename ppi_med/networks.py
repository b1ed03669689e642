"""Networks: the multi-view CNN (MVCNN) of the GA model, and 3D classifiers for nodule patches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from monai.networks.nets import DenseNet, ResNet
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .flags import as_bool

__all__ = ["BACKBONES", "MVCNN", "backbone_segments", "make_backbone", "make_classifier_3d"]

BACKBONES = ("resnet10", "resnet18", "resnet34", "densenet")

_RESNET_LAYERS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


def make_backbone(
    name: str,
    spatial_dims: int,
    in_channels: int,
    width: int = 64,
    out_classes: int | None = None,
    pool: str = "avg",
) -> tuple[nn.Module, int]:
    """A MONAI ResNet or DenseNet, as a feature extractor or a whole classifier.

    Args:
        name: one of :data:`BACKBONES`.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        width: channels of the first stage (ResNet stages are ``width * (1, 2, 4, 8)``; DenseNet's initial
            features); 64 is the published size, smaller widths suit a CPU.
        out_classes: ``None`` for a feature extractor ending in global pooling, else the number of classes.
        pool: global pooling of the ResNet's last feature map, ``avg`` or ``max`` (a small lesion is
            diluted by averaging over a whole B-scan; the maximum keeps it).

    Returns:
        The module and its output width (features or classes).

    Raises:
        ValueError: an unknown backbone name.
    """
    if name in _RESNET_LAYERS:
        widths = [width, 2 * width, 4 * width, 8 * width]
        net = ResNet(
            block="basic",
            layers=_RESNET_LAYERS[name],
            block_inplanes=widths,
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=out_classes or 2,
            feed_forward=out_classes is not None,
        )
        if pool == "max":
            net.avgpool = (nn.AdaptiveMaxPool2d if spatial_dims == 2 else nn.AdaptiveMaxPool3d)(1)
        elif pool != "avg":
            raise ValueError(f"pool must be 'avg' or 'max', got '{pool}'")
        return net, out_classes or widths[-1]
    if name == "densenet":
        growth = max(4, width // 2)
        net = DenseNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_classes or 2,
            init_features=width,
            growth_rate=growth,
            block_config=(3, 6, 12, 8),
        )
        if out_classes is not None:
            return net, out_classes
        # keep its features, ReLU, pooling and flatten; drop the final linear layer
        out_width = net.class_layers.out.in_features
        del net.class_layers.out
        return net, out_width
    raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")


def backbone_segments(net: nn.Module) -> tuple[list[list[nn.Module]], Callable[[torch.Tensor], torch.Tensor]]:
    """A backbone of :func:`make_backbone` as segments run one after another, and the tail after them.

    The segments are what activation checkpointing recomputes one at a time: the stem (the full-resolution
    convolution, its norm, activation and pooling, the largest activations of all) and each residual block or
    dense layer/transition. Running them in order, then the tail, is the backbone's own forward (checked
    against it for every backbone by the tests).

    Args:
        net: a MONAI ResNet (without its ``fc`` when a feature extractor) or DenseNet as :func:`make_backbone`
            builds them.

    Returns:
        The segments (each a list of modules applied in order) and the tail (pooling, flattening, and the
        classifier layer when there is one).

    Raises:
        TypeError: a network of another type.
    """
    if isinstance(net, ResNet):
        stem = [net.conv1, net.bn1, net.act] + ([] if net.no_max_pool else [net.maxpool])
        blocks = [[block] for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for block in layer]

        def resnet_tail(h: torch.Tensor) -> torch.Tensor:
            h = net.avgpool(h)
            h = h.view(h.size(0), -1)  # as ResNet.forward
            return h if net.fc is None else net.fc(h)

        return [stem, *blocks], resnet_tail
    if isinstance(net, DenseNet):
        children = list(net.features.children())
        stem_end = next(k for k, m in enumerate(children) if len(list(m.children())) > 0)
        segments = [children[:stem_end]]
        for m in children[stem_end:]:
            if isinstance(m, nn.Sequential) and m.__class__.__name__ == "_DenseBlock":
                segments.extend([layer] for layer in m)
            else:
                segments.append([m])
        return segments, net.class_layers
    raise TypeError(f"no checkpoint segments for a backbone of type {type(net).__name__}")


def _run(modules: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    for m in modules:
        h = m(h)
    return h


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


class _Replay:
    """Run a recomputation as the original forward ran, and leave no trace of it.

    The forward hooks and training flags the modules had when the segment first ran are put back for the
    recomputation: a saliency tracer's hooks (WBP's rerouting nodes) have been removed by then, and
    ``contrast_norm="running"`` put batch norm in evaluation mode only for the contrasts' forward; without
    them the recomputed graph would differ from the one autograd recorded. The buffers are restored afterwards:
    batch norm in training mode would otherwise update its running statistics a second time. A class, not a
    generator: every backward pass through the segment (the saliency's, the loss's, a double backward's)
    enters it again.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.state = [(m.training, [dict(getattr(m, name)) for name in _HOOK_DICTS]) for m in modules]
        self._now: list[tuple[bool, list[dict]]] = []
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> None:
        self._now = [(m.training, [getattr(m, name) for name in _HOOK_DICTS]) for m in self.modules]
        self._buffers = [(b, b.detach().clone()) for m in self.modules for b in m.buffers(recurse=False)]
        self._apply(self.state, copy=True)

    def __exit__(self, *exc: object) -> None:
        self._apply(self._now, copy=False)  # the same dict objects: removal handles point at them
        with torch.no_grad():
            for b, saved in self._buffers:
                b.data.copy_(saved)  # through .data, as frozen_buffers: the graph may hold these as saved inputs
        self._now, self._buffers = [], []

    def _apply(self, state: list[tuple[bool, list[dict]]], copy: bool) -> None:
        for m, (training, hooks) in zip(self.modules, state):
            m.training = training
            for name, hook_dict in zip(_HOOK_DICTS, hooks):
                setattr(m, name, hook_dict.copy() if copy else hook_dict)


def _checkpointed(modules: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    """``_run(modules, h)`` under activation checkpointing, recomputed in the backward as it first ran."""
    every = [sub for m in modules for sub in m.modules()]

    def contexts() -> tuple[contextlib.AbstractContextManager, _Replay]:
        # called when the segment first runs: the state its recomputation must reproduce
        return contextlib.nullcontext(), _Replay(every)

    return _checkpoint(_run, modules, h, use_reentrant=False, context_fn=contexts, preserve_rng_state=True)


class MVCNN(nn.Module):
    """Multi-view CNN over the B-scans of an OCT volume.

    A shared 2D backbone embeds every B-scan (view), the embeddings are pooled across views (max, as in
    Su et al.'s MVCNN, or mean), and a linear head classifies the volume. Input ``(N, C, V, H, W)``;
    output logits ``(N, num_classes)``. Every op is one WBP has a rule for, so saliency comes back as a
    volume the shape of the input.

    Args:
        in_channels: channels per B-scan (1 for OCT).
        num_classes: output classes.
        backbone: one of :data:`BACKBONES`.
        width: backbone width (see :func:`make_backbone`).
        view_pool: ``max`` or ``mean``.
        dropout: dropout before the head.
        feature_pool: pooling of each B-scan's feature map, ``avg`` or ``max``.
        checkpoint: activation checkpointing over the backbone (``true``/``false`` strings accepted, as a
            bundle override gives them): only the input of each segment of :func:`backbone_segments` is kept
            for the backward, and the segment's activations are recomputed there, one segment at a time. All
            views still pass each layer together, so batch norm sees the same batch; the recomputation replays
            the forward's hooks and modes and leaves the running statistics as one forward moved them, so
            losses, gradients and saliency equal those without it. It costs one more forward of the backbone
            per backward pass through it (two for the clean batch of a PPI step: the saliency's and the
            loss's). Forward hooks on ``backbone`` itself do not run while it is on (its submodules' do).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        backbone: str = "resnet10",
        width: int = 16,
        view_pool: str = "max",
        dropout: float = 0.2,
        feature_pool: str = "avg",
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if view_pool not in ("max", "mean"):
            raise ValueError(f"view_pool must be 'max' or 'mean', got '{view_pool}'")
        self.checkpoint = as_bool(checkpoint, "MVCNN checkpoint")
        self.backbone, features = make_backbone(backbone, 2, in_channels, width, pool=feature_pool)
        self.view_pool = view_pool
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"MVCNN expects (N, C, V, H, W) volumes, got shape {tuple(x.shape)}")
        n, c, v, h, w = x.shape
        views = x.transpose(1, 2).reshape(n * v, c, h, w)
        emb = self._embed(views).reshape(n, v, -1)
        pooled = emb.amax(dim=1) if self.view_pool == "max" else emb.mean(dim=1)
        return self.head(self.dropout(pooled))

    def _embed(self, views: torch.Tensor) -> torch.Tensor:
        if not (self.checkpoint and torch.is_grad_enabled()):
            return self.backbone(views)
        segments, tail = backbone_segments(self.backbone)
        h = views
        for modules in segments:
            h = _checkpointed(modules, h)
        return tail(h)


def make_classifier_3d(
    backbone: str = "resnet10", in_channels: int = 1, num_classes: int = 2, width: int = 16
) -> nn.Module:
    """A 3D MONAI ResNet or DenseNet classifier for volumes such as nodule patches.

    Args:
        backbone: a name of :data:`BACKBONES` (the same argument as :class:`MVCNN`'s).
        in_channels: input channels.
        num_classes: logits.
        width: channels of the first stage.
    """
    net, _ = make_backbone(backbone, 3, in_channels, width, out_classes=num_classes)
    return net
