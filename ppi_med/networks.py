"""Networks: the multi-view CNN (MVCNN) of the GA model, and 3D classifiers for nodule patches."""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet, ResNet
from torch import nn

__all__ = ["BACKBONES", "MVCNN", "make_backbone", "make_classifier_3d"]

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
    ) -> None:
        super().__init__()
        if view_pool not in ("max", "mean"):
            raise ValueError(f"view_pool must be 'max' or 'mean', got '{view_pool}'")
        self.backbone, features = make_backbone(backbone, 2, in_channels, width, pool=feature_pool)
        self.view_pool = view_pool
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"MVCNN expects (N, C, V, H, W) volumes, got shape {tuple(x.shape)}")
        n, c, v, h, w = x.shape
        views = x.transpose(1, 2).reshape(n * v, c, h, w)
        emb = self.backbone(views).reshape(n, v, -1)
        pooled = emb.amax(dim=1) if self.view_pool == "max" else emb.mean(dim=1)
        return self.head(self.dropout(pooled))


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
