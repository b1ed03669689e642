"""A small real export for the review tests: three CT-like volumes with a bright lesion and its mask, exported by
:func:`ppi_med.export.export_saliency` with two saliency methods through the LIDC-style preprocessing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, EnsureTyped, LoadImaged, Orientationd, ResizeWithPadOrCropd, ScaleIntensityRanged
from torch import nn

from ppi_med.export import export_saliency
from ppi_med.saliency_spec import SaliencySpec

__all__ = ["LesionNet", "make_export"]


class LesionNet(nn.Module):
    """Two logits from a small convolution: enough for real gradient-based saliency with a spatial pattern."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.bias += torch.tensor([0.0, 0.5])  # leans positive: the label-0 case is a false positive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).amax(dim=(2, 3, 4)))


def _volume(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).transpose(1, 2, 3, 0)
    inside = np.linalg.norm(idx - np.asarray(centre), axis=-1) <= radius
    vol = rng.normal(-800.0, 40.0, shape).astype(np.float32)
    vol[inside] = rng.normal(40.0, 20.0, int(inside.sum()))
    return vol, inside.astype(np.uint8)


def make_export(folder: Path, methods: str = "gradient,input_x_gradient") -> Path:
    """Write three cases (one with label 0 and no lesion mask) and export them into ``folder/export``.

    Returns:
        The export folder.
    """
    data = folder / "data"
    data.mkdir(parents=True)
    affine = np.array([[-0.8, 0, 0, 20.0], [0, -0.8, 0, 30.0], [0, 0, 1.5, -40.0], [0, 0, 0, 1]])
    records = []
    for n, (centre, label) in enumerate((((12, 10, 8), 1), ((8, 14, 6), 1), ((10, 10, 8), 0))):
        vol, mask = _volume((24, 24, 16), centre, 3.5 if label else 0.0, seed=n)
        img = nib.Nifti1Image(vol, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        nib.save(img, data / f"case{n}.nii.gz")
        rec = {"image": str(data / f"case{n}.nii.gz"), "label": label, "case_id": f"case{n}"}
        if label:
            nib.save(nib.Nifti1Image(mask, affine), data / f"case{n}_mask.nii.gz")
            rec["mask"] = str(data / f"case{n}_mask.nii.gz")
        records.append(rec)
    preprocessing = Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            Orientationd("image", axcodes="RAS"),
            ScaleIntensityRanged("image", a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True),
            ResizeWithPadOrCropd("image", spatial_size=(24, 24, 16)),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )
    out = folder / "export"
    export_saliency(
        SaliencySpec(LesionNet(), preprocessing, records, methods=methods, progress=False), out, montage=False
    )
    return out
