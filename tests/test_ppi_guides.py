"""Tests of the PPI guides, fills and controls: each against the property that defines it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ppi_med.annotations import Outlined, keep_outlines
from ppi_med.ppi import GUIDES, MASKS, PPIConfig, PPIObjective, variant_fields
from ppi_med.ppi.guides import SitePrototypes, annotation_regions, site_regions
from ppi_med.ppi.interventions import FILLS, fill_values, intervene, other_class_donors, random_erase, relocate
from ppi_med.saliency import METHODS


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


class _Recorder:
    """Records every batch a model is fed (the traced forward first, then the contrasts)."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        model.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0].detach().clone()))


def test_fills_keep_the_image_outside_the_mask_and_put_their_value_inside() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 8, 9, generator=g)
    y = torch.tensor([1, 0, 1])
    mask = torch.zeros_like(x)
    mask[:, :, 2:5, 3:6] = 1
    for kind in FILLS:
        f = fill_values(x, kind, y=y, generator=torch.Generator().manual_seed(1))
        out = intervene(x, mask, f)
        torch.testing.assert_close(out[mask == 0], x[mask == 0])
        torch.testing.assert_close(out[mask == 1], f[mask == 1])
    torch.testing.assert_close(fill_values(x, "mean"), x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    # blur keeps a constant image and the mean of a smooth one; it lowers the variance of noise
    const = torch.full((1, 1, 6, 7, 8), 0.3)
    torch.testing.assert_close(fill_values(const, "blur"), const)
    assert fill_values(x, "blur").var() < x.var() / 3
    # other_class: the donor has the other label
    torch.testing.assert_close(fill_values(x, "other_class", y=y), x[[1, 0, 1]])
    with pytest.raises(ValueError, match="other_class"):
        fill_values(x, "other_class")
    with pytest.raises(ValueError, match="unknown PPI fill"):
        fill_values(x, "sideways")


def test_other_class_donors_take_another_label_and_fall_back_to_self() -> None:
    assert other_class_donors(torch.tensor([0, 0, 1, 1, 0])).tolist() == [3, 3, 1, 1, 3]
    assert other_class_donors(torch.tensor([1, 1])).tolist() == [0, 1]


def test_relocate_keeps_each_masks_values_and_moves_it() -> None:
    mask = torch.zeros(4, 1, 10, 12)
    mask[:, :, 1:4, 2:6] = torch.rand(4, 1, 3, 4)
    moved = relocate(mask, torch.Generator().manual_seed(3))
    for i in range(4):
        torch.testing.assert_close(moved[i].flatten().sort().values, mask[i].flatten().sort().values)
    assert not torch.equal(moved, mask)


def test_random_erase_erases_one_box_per_chosen_sample_within_the_area_range() -> None:
    x = torch.full((40, 1, 20, 20), -1.0)
    x[:, :, 0, 0] = 2.0  # the intensity range the noise is drawn in: [-1, 2]
    out = random_erase(x, p=0.5, area=(0.05, 0.2), generator=torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1)
    erased = changed.any(dim=1)
    assert 10 <= int(erased.sum()) <= 30
    share = changed[erased].float().mean(dim=1)
    assert share.max() <= 0.2 + 0.05 and share.min() > 0.0
    assert out.min() >= -1.0 and out.max() <= 2.0
    assert torch.equal(random_erase(x, p=0.0), x)


def test_annotation_regions_are_the_outline_and_the_salient_rest() -> None:
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 0:2, 0:2] = 1  # salient corner (a watermark)
    mask[..., 3:5, 3:5] = 1  # salient lesion
    outline = torch.zeros(1, 1, 6, 6)
    outline[..., 3:5, 3:5] = 1
    evidence, nuisance = annotation_regions(mask, outline)
    assert torch.equal(evidence, outline)
    assert torch.equal(nuisance, mask * (1 - outline)) and nuisance[..., 0:2, 0:2].eq(1).all()


def test_site_prototypes_mark_what_only_one_site_finds_salient() -> None:
    protos = SitePrototypes(momentum=0.0, min_count=2)
    shared = torch.zeros(1, 8, 8)
    shared[:, 3:5, 3:5] = 1
    corner = torch.zeros(1, 8, 8)
    corner[:, 0:2, 0:2] = 1
    masks = torch.stack([shared + corner, shared, shared + corner, shared])  # site D's positives carry the corner
    sites, y = ["D", "A", "D", "A"], torch.tensor([1, 1, 1, 1])
    assert protos.specific("D", 1) is None
    protos.update(masks, sites, y)
    spec = protos.specific("D", 1)
    assert spec[0, 0:2, 0:2].eq(1).all() and spec[0, 3:5, 3:5].eq(0).all()
    assert protos.specific("A", 1).eq(0).all()  # nothing A has that D lacks
    assert protos.specific("D", 0) is None  # no class-0 sample seen
    evidence, nuisance = site_regions(masks, sites, y, protos)
    torch.testing.assert_close(nuisance[0], corner)
    torch.testing.assert_close(evidence[0], shared)
    torch.testing.assert_close(evidence[1], shared)


def test_guided_objective_removes_evidence_in_x_star_and_nuisance_in_x_prime() -> None:
    model = _net()
    rec = _Recorder(model)
    x = torch.rand(4, 1, 8, 8) + 0.5
    y = torch.tensor([1, 0, 1, 0])
    outline = torch.zeros(4, 1, 8, 8)
    outline[0, :, 2:4, 2:4] = 1
    annotated = torch.tensor([True, True, False, False])
    cfg = PPIConfig(guide="annotation", fill="zero", annotation_dilate=0, warmup_epochs=0)
    out = PPIObjective(cfg)(model, x, y, epoch=1, annotation=outline, annotated=annotated)
    contrasts = rec.inputs[-1]
    x_neg, x_adv = contrasts[:4], contrasts[4:]
    # x*: record 0 loses exactly its outline; unannotated records lose their own salient region
    torch.testing.assert_close(x_neg[0], x[0] * (1 - outline[0]))
    assert out.terms["loss_con"] > 0
    # x': record 0 keeps its outline (only salient voxels outside it go), unannotated records have none removed
    torch.testing.assert_close(x_adv[0][outline[0] == 1], x[0][outline[0] == 1])
    torch.testing.assert_close(x_adv[2:], x[2:])


def test_adversarial_classes_keep_x_prime_to_those_labels() -> None:
    x, y = torch.rand(4, 1, 8, 8) + 0.5, torch.tensor([1, 0, 1, 0])
    outline = torch.zeros(4, 1, 8, 8)
    outline[0::2, :, 2:4, 2:4] = 1
    fed, losses = {}, {}
    for classes in (None, [1]):
        model = _net()
        rec = _Recorder(model)
        cfg = PPIConfig(guide="study", fill="zero", annotation_dilate=0, warmup_epochs=0, adversarial_classes=classes)
        out = PPIObjective(cfg)(model, x, y, epoch=1, annotation=outline, annotated=torch.ones(4, dtype=torch.bool))
        fed[str(classes)], losses[str(classes)] = rec.inputs[-1], out.terms["loss_ad"]
    # x* of the two outlined positives, then x' of every record, or of the positives only
    assert fed["None"].shape[0] == 4 + 4 and fed["[1]"].shape[0] == 4 + 2
    torch.testing.assert_close(fed["[1]"][4:], fed["None"][4:][y == 1])
    with torch.no_grad():
        expected = F.cross_entropy(_net()(fed["[1]"][4:]), y[y == 1])
    assert float(losses["[1]"]) == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="adversarial_classes"):
        PPIConfig(adversarial_classes=["GA"])


def test_partner_and_exclusive_change_nothing_under_the_outline_guides() -> None:
    """The GA bundle keeps the partner form's settings; with the study guide they must not act (README)."""
    x, y = torch.rand(4, 1, 8, 8) + 0.5, torch.tensor([1, 0, 1, 0])
    outline = torch.zeros(4, 1, 8, 8)
    outline[0::2, :, 2:4, 2:4] = 1
    terms = []
    for partner, exclusive in (("same_class", True), ("roll", False)):
        cfg = PPIConfig(guide="study", partner=partner, exclusive=exclusive, warmup_epochs=0, contrast_classes=[1])
        out = PPIObjective(cfg)(_net(), x, y, epoch=1, annotation=outline, annotated=torch.ones(4, dtype=torch.bool))
        terms.append({k: float(v) for k, v in out.terms.items()})
    assert terms[0] == terms[1] and terms[0]["loss_con"] > 0


def test_study_guide_without_sites_or_outlines_has_no_adversarial_term() -> None:
    model = _net()
    rec = _Recorder(model)
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 0, 1, 1, 0])
    out = PPIObjective(PPIConfig(warmup_epochs=0))(model, x, y, epoch=1)
    assert rec.inputs[-1].shape[0] == 6  # x* only
    assert float(out.terms["loss_ad"]) == 0.0


def test_site_guide_needs_sites_and_annotation_guide_needs_outlines() -> None:
    model, x, y = _net(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="site"):
        PPIObjective(PPIConfig(guide="site"))(model, x, y, epoch=5)
    with pytest.raises(ValueError, match="outlines"):
        PPIObjective(PPIConfig(guide="annotation"))(model, x, y, epoch=5)


def test_random_mask_control_removes_the_same_area_elsewhere() -> None:
    x, y = torch.rand(4, 1, 10, 10) + 0.5, torch.tensor([1, 0, 1, 0])
    outline = torch.zeros(4, 1, 10, 10)
    outline[:, :, 1:4, 1:4] = 1
    seen = {}
    for control in ("none", "random_mask"):
        model = _net()
        rec = _Recorder(model)
        cfg = PPIConfig(guide="annotation", fill="zero", annotation_dilate=0, control=control, warmup_epochs=0)
        PPIObjective(cfg, generator=torch.Generator().manual_seed(0))(
            model, x, y, epoch=1, annotation=outline, annotated=torch.ones(4, dtype=torch.bool)
        )
        seen[control] = rec.inputs[-1][:4] == 0  # the removed voxels of x* (zero fill)
    assert torch.equal(seen["none"].sum(dim=(1, 2, 3)), seen["random_mask"].sum(dim=(1, 2, 3)))
    assert not torch.equal(seen["none"], seen["random_mask"])


def test_ramp_raises_the_weights_linearly_after_the_warm_up() -> None:
    cfg = PPIConfig(warmup_epochs=2, ramp_epochs=4, w_con=1.0, w_ad=2.0, w_reg=0.1)
    assert cfg.weights(2) == {"con": 0.0, "reg": 0.0, "ad": 0.0}
    assert cfg.weights(3)["ad"] == pytest.approx(0.5)
    assert cfg.weights(5)["con"] == pytest.approx(0.75)
    assert cfg.weights(6) == {"con": 1.0, "reg": 0.1, "ad": 2.0}
    assert cfg.weights(9) == cfg.weights(6)


def test_method_names_round_trip_through_the_variant_grammar() -> None:
    configs = [
        PPIConfig(enabled=False),
        PPIConfig(enabled=False, random_erasing=0.5),
        PPIConfig(),
        PPIConfig(mask="box"),
        PPIConfig(guide="partner"),
        PPIConfig(saliency="input_x_gradient", mask="soft_adaptive", guide="site", control="random_mask"),
        PPIConfig(fill="other_class"),
        PPIConfig(guide="partner", fill="blur", control="random_mask"),
    ]
    for cfg in configs:
        fields = variant_fields(cfg.method, METHODS)
        assert PPIConfig(**{**fields}).method == cfg.method
    assert variant_fields("random_mask", METHODS) == {"enabled": True, "control": "random_mask"}
    for bad in ("ppi_nope", "ppi_wbp_sideways", "pp", "baseline_x"):
        with pytest.raises(ValueError, match="unknown method"):
            variant_fields(bad, METHODS)
    assert set(GUIDES) >= {"study", "partner"} and "soft" in MASKS


def test_config_rejects_bad_guide_fill_control_and_erasing() -> None:
    for kwargs, word in (
        ({"guide": "x"}, "guide"),
        ({"fill": "x"}, "fill"),
        ({"control": "x"}, "control"),
        ({"enabled": False, "random_erasing": 2.0}, "random_erasing"),
        ({"random_erasing": 0.5}, "random_erasing"),
        ({"ramp_epochs": -1}, "ramp_epochs"),
        ({"site_momentum": 1.0}, "site_momentum"),
    ):
        with pytest.raises(ValueError, match=word):
            PPIConfig(**kwargs)


def test_keep_outlines_keeps_a_nested_share_per_label() -> None:
    records = [{"image": f"{i}.nii", "mask": f"{i}_m.nii", "label": i % 2} for i in range(20)] + [
        {"image": "x.nii", "label": 1}
    ]
    kept = {share: {r["image"] for r in keep_outlines(records, share, seed=3) if "mask" in r} for share in (0, 0.3, 1)}
    assert kept[0] == set() and len(kept[1]) == 20
    assert len(kept[0.3]) == 6 and sum(int(k.split(".")[0]) % 2 for k in kept[0.3]) == 3
    assert kept[0.3] <= kept[1]
    assert all("mask" in r for r in records[:20])  # the input is not modified
    with pytest.raises(ValueError, match="share"):
        keep_outlines(records, 1.5)


def test_outlined_gives_every_record_the_same_fields() -> None:
    from monai.data import MetaTensor

    image = MetaTensor(torch.rand(1, 4, 5, 6))
    with_outline = Outlined()({"image": image, "mask": torch.ones(1, 4, 5, 6) * 2})
    without = Outlined()({"image": image})
    assert with_outline["annotated"] and not without["annotated"]
    assert with_outline["annotation"].max() == 1.0 and "mask" not in with_outline
    assert without["annotation"].shape == (1, 4, 5, 6) and without["annotation"].sum() == 0
    with pytest.raises(ValueError, match="grid"):
        Outlined()({"image": image, "mask": torch.ones(1, 4, 5, 5)})
    with pytest.raises(ValueError, match="not loaded"):
        Outlined()({"image": image, "mask": "a/b_mask.nii.gz"})


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_ga_bundle_batches_carry_outlines_on_the_image_grid_and_sites(tmp_path, share: float) -> None:
    """The GA bundle's own training pipeline: each batch has the outline resized with the image, the flag,
    and the site; with ``annotation_share`` 0.5 half the training eyes of each class keep their outline."""
    from bundle_files import GA_BUNDLE

    from pipelines.bundle_config import open_config

    overrides = {
        "default_dataset_dir": str(tmp_path / "data"),
        "dataset_dir": str(tmp_path / "data"),
        "synthetic": {
            "sites": ["A", "B"],
            "cue_site": "B",
            "subjects_per_site": 8,
            "n_bscans": 4,
            "height": 32,
            "width": 48,
        },
        "spatial_size": [4, 32, 48],
        "annotation_share": share,
        "batch_size": 64,
    }
    parser = open_config(GA_BUNDLE, overrides)
    records = parser.get_parsed_content("train#datalist")
    outlined = [r for r in records if "mask" in r]
    for label in (0, 1):
        n = sum(r["label"] == label for r in records)
        assert sum(r["label"] == label for r in outlined) == round(share * n)
    batch = next(iter(parser.get_parsed_content("common#train_loader")))
    assert batch["annotation"].shape == batch["image"].shape == (len(records), 1, 4, 32, 48)
    assert int(batch["annotated"].sum()) == len(outlined)
    assert set(batch["site"]) == {"A", "B"}
    gae = (batch["label"] == 1) & batch["annotated"]
    assert bool(gae.any()) and all(float(a.sum()) > 0 for a in batch["annotation"][gae])
    assert float(batch["annotation"][batch["label"] == 0].sum()) == 0.0  # no GA, nothing outlined


def test_other_class_fill_puts_other_class_content_in_x_star_only() -> None:
    """x* (must lose the label) takes another class's voxels; x' (must keep it) never does, unless asked."""
    x = torch.stack([torch.full((1, 6, 6), v) for v in (1.0, 2.0, 3.0, 4.0)])
    y = torch.tensor([1, 0, 1, 0])
    outline = torch.zeros(4, 1, 6, 6)
    outline[:, :, 2:4, 2:4] = 1
    seen = {}
    for adversarial in (None, "other_class"):
        model = _net()
        rec = _Recorder(model)
        cfg = PPIConfig(guide="annotation", fill="other_class", adversarial_fill=adversarial, annotation_dilate=0)
        PPIObjective(cfg)(model, x, y, epoch=5, annotation=outline, annotated=torch.ones(4, dtype=torch.bool))
        seen[adversarial] = rec.inputs[-1]
    x_neg, x_adv = seen[None][:4], seen[None][4:]
    donors = other_class_donors(y)
    torch.testing.assert_close(x_neg[:, :, 2:4, 2:4], x[donors][:, :, 2:4, 2:4])
    # x' blends each image with zeros only (soft masks): every voxel between 0 and its own value
    assert bool(((x_adv >= 0) & (x_adv <= x + 1e-6)).all())
    # asked to, x' takes the donors' voxels: sample 0 (value 1) gets some of sample 3's 4.0
    assert float(seen["other_class"][4:][0].max()) > 1.5
