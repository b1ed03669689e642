"""The one mask reader: the keys it is given, the image's grid, and errors that name the file."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from ppi_med.masks import read_case_mask


def _save(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


@pytest.fixture()
def case(tmp_path):
    """A 2 mm scan under ``scan``, a 1 mm patch under ``image``, and the same lesion drawn on each grid."""
    scan_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    patch_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    scan_lesion = np.zeros((10, 10, 10), np.uint8)
    scan_lesion[4:6, 4:6, 4:6] = 1  # world 8..11 mm
    patch_lesion = np.zeros((16, 16, 16), np.uint8)
    patch_lesion[8:12, 8:12, 8:12] = 1
    return {
        "image": _save(tmp_path / "patch.nii.gz", np.zeros((16, 16, 16), np.float32), patch_aff),
        "scan": _save(tmp_path / "scan.nii.gz", np.zeros((10, 10, 10), np.float32), scan_aff),
        "mask": _save(tmp_path / "patch_mask.nii.gz", patch_lesion, patch_aff),
        "scan_mask": _save(tmp_path / "scan_mask.nii.gz", scan_lesion, scan_aff),
    }


def test_the_keys_are_honoured(case):
    on_patch = read_case_mask(case)
    assert on_patch.shape == (16, 16, 16) and on_patch.dtype == bool and on_patch.sum() == 64
    on_scan = read_case_mask(case, image_key="scan", mask_key="scan_mask")
    assert on_scan.shape == (10, 10, 10) and np.array_equal(on_scan, nib.load(case["scan_mask"]).get_fdata() > 0)
    # the patch's mask put on the scan's grid (2 mm voxels): the voxels whose centres lie inside the lesion
    with pytest.warns(UserWarning, match="another grid"):
        resampled = read_case_mask(case, image_key="scan", mask_key="mask", case="n1")
    assert resampled.shape == (10, 10, 10) and resampled[4:6, 4:6, 4:6].all() and resampled.sum() == 8
    assert read_case_mask({"image": case["image"]}) is None
    assert read_case_mask({**case, "mask": ""}) is None
    with pytest.raises(KeyError, match="no image key 'ct'"):
        read_case_mask(case, image_key="ct")


def test_a_bad_mask_file_is_named(case, tmp_path):
    broken = tmp_path / "broken_mask.nii.gz"
    broken.write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match=r"case eye1: cannot read the mask .*broken_mask\.nii\.gz"):
        read_case_mask({**case, "mask": str(broken)}, case="eye1")
    with pytest.raises(FileNotFoundError, match=r"case eye1: mask not found: .*gone\.nii\.gz"):
        read_case_mask({**case, "mask": str(tmp_path / "gone.nii.gz")}, case="eye1")
    flat = _save(tmp_path / "flat_mask.nii.gz", np.ones((4, 4), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="flat_mask.nii.gz"):
        read_case_mask({**case, "mask": flat}, case="eye1")
    far = np.eye(4)
    far[:3, 3] = 500.0  # the same scanner frame, half a metre away
    away = _save(tmp_path / "away_mask.nii.gz", np.ones((4, 4, 4), np.uint8), far)
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"away_mask.nii.gz does not overlap"):
        warnings.simplefilter("ignore")
        read_case_mask({**case, "mask": away}, case="eye1")
