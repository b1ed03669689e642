"""Tests of ppi_med.cues: where each cue kind lands, its amplitude, and the exact class shares of cue_flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppi_med.cues import CUE_KINDS, SpuriousCue, SpuriousCued, cue_flags


def test_patch_sits_in_the_corner_with_the_requested_amplitude():
    img = torch.rand(1, 12, 12) * 2.0  # intensity range about 2
    span = float(img.max() - img.min())
    out = SpuriousCue("patch", strength=0.5, size=3)(img)
    diff = out - img
    assert torch.allclose(diff[0, :3, :3], torch.full((3, 3), 0.5 * span))
    diff[0, :3, :3] = 0
    assert diff.abs().max() == 0


def test_line_is_the_far_edge_of_the_last_axis_and_works_in_3d():
    img = torch.zeros(1, 4, 6, 8)
    img[0, 1, 2, 3] = 1.0
    out = SpuriousCue("line", strength=1.0, size=2)(img)
    assert torch.all(out[..., -2:] >= 1.0)
    assert torch.equal(out[..., :-2], img[..., :-2])


def test_intensity_shifts_everything_and_texture_alternates():
    img = torch.zeros(1, 4, 4)
    img[0, 0, 0] = 1.0
    assert torch.allclose(SpuriousCue("intensity", strength=0.25)(img) - img, torch.full_like(img, 0.25))
    stripes = SpuriousCue("texture", strength=1.0, period=2)(img) - img
    assert torch.equal(stripes[0, 0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.equal(stripes[0, 0], stripes[0, 3])


def test_numpy_in_numpy_out_and_input_untouched():
    img = np.zeros((1, 5, 5), dtype=np.float32)
    img[0, 2, 2] = 1
    out = SpuriousCue("patch", size=2)(img)
    assert isinstance(out, np.ndarray) and out[0, 0, 0] == 1.0 and img[0, 0, 0] == 0.0


def test_dictionary_wrapper_follows_the_flag():
    cue = SpuriousCued("image", flag_key="cue", kind="patch", size=1)
    with_cue = cue({"image": torch.eye(3)[None], "cue": True})
    without = cue({"image": torch.eye(3)[None], "cue": False})
    assert with_cue["image"][0, 0, 0] == 2.0 and without["image"][0, 0, 0] == 1.0


@pytest.mark.parametrize("bad", [dict(kind="stamp"), dict(strength=0.0), dict(size=0), dict(period=1)])
def test_bad_settings_are_named(bad):
    with pytest.raises(ValueError, match="cue"):
        SpuriousCue(**bad)


def test_cue_flags_have_exact_shares_per_class():
    y = np.array([1] * 40 + [0] * 60)
    flags = cue_flags(y, 0.95, 0.05, np.random.default_rng(0))
    assert flags[y == 1].sum() == 38 and flags[y == 0].sum() == 3
    again = cue_flags(y, 0.95, 0.05, np.random.default_rng(0))
    assert np.array_equal(flags, again)
    with pytest.raises(ValueError, match="p_pos"):
        cue_flags(y, 1.5, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="binary"):
        cue_flags(np.array([0, 2]), 0.5, 0.5, np.random.default_rng(0))


def test_every_kind_changes_the_image():
    img = torch.rand(1, 8, 8)
    for kind in CUE_KINDS:
        assert not torch.equal(SpuriousCue(kind)(img), img), kind


def test_region_marks_where_the_cue_goes():
    img = torch.zeros(1, 6, 6)
    for kind in ("patch", "line"):
        cue = SpuriousCue(kind, size=2)
        region = cue.region(img.shape)
        changed = cue(img) != img
        assert torch.equal(region, changed), kind
    assert SpuriousCue("texture").region(img.shape) is None
    assert SpuriousCue("intensity").region(img.shape) is None
