"""The settings export and saliency evaluation share: normalised and checked once, when the spec is built."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import Compose
from torch import nn

from ppi_med.saliency_spec import SaliencySpec


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=tuple(range(1, x.dim()))).unsqueeze(1))


def blob(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x)


def _spec(**kw) -> SaliencySpec:
    return SaliencySpec(Tiny(), Compose([]), ["a.nii.gz"], **kw)


def test_methods_and_targets_are_normalised_to_tuples():
    spec = _spec(methods="wbp, gradcam", targets=["predicted", "1", 1])
    assert spec.methods == ("wbp", "gradcam") and spec.method_names == ("wbp", "gradcam")
    assert spec.targets == ("predicted", 1)
    with pytest.raises(ValueError, match="one target choice"):
        spec.single_target()
    custom = _spec(methods=[blob, "wbp"], targets="label")
    assert custom.named_methods == {"blob": blob, "wbp": "wbp"} and custom.single_target() == "label"
    assert _spec(checkpoint=None).checkpoint is None


def test_method_options_are_keyed_by_method_name():
    # one method: its options directly, or keyed by its name
    assert _spec(methods="gradcam", method_kwargs={"layer": "head"}).method_kwargs == {"gradcam": {"layer": "head"}}
    keyed = _spec(methods="gradcam", method_kwargs={"gradcam": {"layer": "head"}})
    assert keyed.method_kwargs == {"gradcam": {"layer": "head"}}
    two = _spec(methods=["wbp", "gradcam"], method_kwargs={"gradcam": {"layer": "head"}})
    assert two.method_kwargs == {"wbp": {}, "gradcam": {"layer": "head"}}
    with pytest.raises(ValueError, match=r"unknown: \['layer'\]"):
        _spec(methods=["wbp", "gradcam"], method_kwargs={"layer": "head"})


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"methods": "smoothgrad"}, "unknown saliency method"),
        ({"methods": ""}, "no saliency method"),
        ({"methods": ["wbp", "wbp"]}, "named twice"),
        ({"methods": [3]}, "name or a callable"),
        ({"targets": "best"}, "unknown target"),
        ({"targets": -1}, ">= 0"),
        ({"require_checkpoint": True}, "no checkpoint given"),
    ],
)
def test_bad_settings_are_refused_when_the_spec_is_built(kw, message):
    with pytest.raises(ValueError, match=message):
        _spec(**kw)
