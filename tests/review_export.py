"""Small real exports for the review tests, written by :func:`ppi_med.export.export_saliency` with two saliency
methods: three CT-like volumes with a bright lesion and its mask through the LIDC-style preprocessing
(:func:`make_export`), and two synthetic OCT eyes of :mod:`data_prep.synth_oct` (one with GA) through the GA
bundle's kind of preprocessing (:func:`make_oct_export`)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
)
from torch import nn
from torch.nn import functional as F

from data_prep.synth_oct import generate
from ppi_med.export import export_saliency
from ppi_med.saliency_spec import SaliencySpec

__all__ = ["ChoroidNet", "LesionNet", "OCT_SHAPE", "make_export", "make_oct_export"]

#: (B-scans, depth rows, A-scans) of the synthetic OCT eyes of :func:`make_oct_export`.
OCT_SHAPE = (16, 96, 160)


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


class ChoroidNet(nn.Module):
    """GA's sign on OCT, a bright choroid under the lost RPE (hypertransmission), as two logits: class 1 grows with
    the locally averaged intensity above ``level`` in the lower part of each B-scan. Its gradient saliency lies on
    the lesion, as a trained model's should; it leans to class 1, so the eye without GA is a false positive."""

    def __init__(self, band: tuple[float, float] = (0.7, 0.82), level: float = 0.65) -> None:
        super().__init__()
        self.band, self.level = band, level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[3]
        rows = torch.zeros(h, dtype=x.dtype, device=x.device)
        rows[int(self.band[0] * h) : int(self.band[1] * h)] = 1.0
        local = F.avg_pool3d(x, 3, stride=1, padding=1)
        score = (torch.relu(local - self.level) * rows.view(1, 1, 1, h, 1)).flatten(1).mean(1) * 50.0
        return torch.stack([-score, score + 0.5], dim=1)


def make_oct_export(folder: Path, methods: str = "gradient,input_x_gradient") -> Path:
    """Write two synthetic OCT eyes (``A-000`` with GA and its lesion mask, ``A-001`` without) in the
    ``(V, H, W)`` convention of :mod:`data_prep.oct_nifti` and export them into ``folder/export``.

    Returns:
        The export folder.
    """
    v, h, w = OCT_SHAPE
    datalist = generate(
        folder / "oct",
        sites=["A"],
        subjects_per_site=2,
        n_bscans=v,
        height=h,
        width=w,
        cue_site=None,
        seed=1,
        progress=False,
    )

    records = []
    for rec in json.loads(Path(datalist).read_text())["training"]:
        records.append(
            {
                "image": str(datalist.parent / rec["image"]),
                "mask": str(datalist.parent / rec["mask"]),
                "label": rec["label"],
                "case_id": rec["subject"],
            }
        )
    preprocessing = Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            Resized("image", spatial_size=(v, h // 2, w // 2), mode="area"),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )
    out = folder / "export"
    export_saliency(
        SaliencySpec(ChoroidNet(), preprocessing, records, methods=methods, progress=False), out, montage=False
    )
    return out
