"""The grammar of PPI variants: specs read into configurations, and configurations written back as labels."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from ppi_med.methods import method_label, method_settings, split_comparator
from ppi_med.ppi import PPIConfig, VariantError, variant, variant_fields, variant_label
from ppi_med.ppi.objective import MODES, PARTNERS
from ppi_med.ppi.variants import RECIPE_FIELDS, parse_value, render_value, split_fields

# configurations that differ from the defaults in one or several fields, of every kind of value
CONFIGS = [
    PPIConfig(),
    PPIConfig(mode="detached"),
    PPIConfig(partner="roll"),
    PPIConfig(mode="detached", partner="roll"),
    PPIConfig(mask="box", guide="partner", fill="zero", exclusive=False, warmup_epochs=0, partner="roll"),
    PPIConfig(saliency="gradcam", saliency_kwargs={"layer": "features.3"}),
    PPIConfig(contrast_classes=[0, 1], omega=50.0, adversarial_fill="blur", con_boost_epoch=4, no_harm=True),
    PPIConfig(control="random_mask"),
    PPIConfig(saliency="input_x_gradient", mask="soft_adaptive", control="random_mask", sigma=0.1),
    PPIConfig(enabled=False),
    PPIConfig(enabled=False, random_erasing=0.5),
    PPIConfig(enabled=False, random_erasing=0.3),
]


def test_the_default_keeps_its_label_and_the_old_names_still_read():
    assert variant_label(PPIConfig()) == PPIConfig().method == "ppi_wbp"
    assert variant("ppi") == variant("ppi_wbp") == PPIConfig()
    assert variant("ppi_wbp_box") == PPIConfig(mask="box")
    assert variant("ppi_wbp_partner_zero") == PPIConfig(guide="partner", fill="zero")
    assert variant("random_mask") == PPIConfig(control="random_mask")
    assert variant("random_erasing") == PPIConfig(enabled=False, random_erasing=0.5)
    assert variant_label(PPIConfig(enabled=False)) == "baseline"
    # the GA bundle's recipe (a warm-up of half its epochs, the lesion class) is not part of the method's name
    assert PPIConfig(contrast_classes=[1], warmup_epochs=12, ramp_epochs=4).method == "ppi_wbp"


@pytest.mark.parametrize("field, values", [("mode", MODES), ("partner", PARTNERS)])
def test_configurations_differing_only_in_mode_or_partner_get_different_labels(field, values):
    for guide in ("study", "partner"):
        labels = {variant_label(PPIConfig(guide=guide, **{field: v})) for v in values}
        assert len(labels) == len(values)
        methods = {PPIConfig(guide=guide, contrast_classes=[1], **{field: v}).method for v in values}
        assert len(methods) == len(values)  # the bundles' run tag too


def test_different_configurations_never_share_a_label():
    enabled = [c for c in CONFIGS if c.enabled]
    for a, b in itertools.combinations(enabled, 2):
        assert variant_label(a) != variant_label(b), (a, b)
    labels = [variant_label(c) for c in CONFIGS]
    assert len(set(labels)) == len(labels)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: variant_label(c))
def test_a_label_reads_back_into_its_configuration(cfg):
    assert variant(variant_label(cfg)) == cfg
    # the run tag reads back on the recipe it was written against
    assert variant(cfg.method, PPIConfig(**{f: getattr(cfg, f) for f in RECIPE_FIELDS})) == cfg


def test_labels_are_relative_to_the_base_they_are_read_against():
    lidc = PPIConfig(mode="detached", guide="partner", fill="zero")  # the LIDC bundle's own ppi
    assert variant_label(lidc, lidc) == "ppi_wbp"
    assert variant_label(replace(lidc, mask="box"), lidc) == "ppi_wbp_box"
    back = replace(lidc, mode="differentiable", guide="study")
    assert variant_label(back, lidc) == "ppi_wbp_study:mode=differentiable"
    assert variant(variant_label(back, lidc), lidc) == back
    assert lidc.method == "ppi_wbp_partner_zero:mode=detached"  # its mode is in the run's name now


def test_one_spelling_per_configuration():
    same = ["ppi", "ppi_wbp", "ppi:mode=differentiable", "ppi:saliency=wbp", "ppi:omega=100", "ppi:omega=1e2"]
    assert {variant_label(variant(s)) for s in same} == {"ppi_wbp"}
    assert variant_label(variant("ppi:partner=roll,mode=detached,mask=box")) == "ppi_wbp_box:mode=detached,partner=roll"
    assert variant_label(variant("ppi:exclusive=False")) == "ppi_wbp:exclusive=false"


def test_values_are_read_by_the_fields_type():
    got = variant_fields('ppi:contrast_classes=[0, 1],saliency_kwargs={"layer": "a.b"},dilate=2,absolute=yes')
    assert got == {"enabled": True, "contrast_classes": [0, 1], "saliency_kwargs": {"layer": "a.b"}, "dilate": 2,
                   "absolute": True}  # fmt: skip
    assert variant_fields("ppi:adversarial_fill=none,con_boost_epoch=null") == {
        "enabled": True,
        "adversarial_fill": None,
        "con_boost_epoch": None,
    }
    assert variant_fields({"omega": 50, "mode": "detached"}) == {"omega": 50.0, "mode": "detached"}
    assert variant_fields("ppi:control=none")["control"] == "none"  # a string field keeps the word
    assert split_fields("a=[0,1],b={'x': 1, 'y': 2},c=3") == ["a=[0,1]", "b={'x': 1, 'y': 2}", "c=3"]
    for name, value in (("omega", 50.0), ("exclusive", False), ("contrast_classes", [1]), ("adversarial_fill", None)):
        assert parse_value(name, render_value(name, value)) == value


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ppo", "unknown method 'ppo'"),
        ("ppi_wbp_circle", "unknown method 'ppi_wbp_circle'"),
        ("ppi:colour=red", "unknown PPI field 'colour'"),
        ("ppi:mode=sideways", "PPI variant 'ppi:mode=sideways': PPI mode must be one of"),
        ("ppi:omega=sharp", "PPI field omega=sharp: not a float"),
        ("ppi:dilate=1.5", "PPI field dilate=1.5: not a int"),
        ("ppi:exclusive=maybe", "PPI exclusive must be true or false, got 'maybe'"),
        ("ppi:contrast_classes=1", "PPI field contrast_classes=1: not a list"),
        ("ppi:saliency=magic", "saliency must be one of"),
        ("ppi:mode", "'mode' is not <field>=<value>"),
        ("ppi:", "nothing after ':'"),
        ("ppi_wbp_box:mask=hard", "mask is set twice"),
        ("ppi:mode=detached,mode=differentiable", "mode is set twice"),
        ("baseline:mode=detached", "baseline trains without PPI, so mode would do nothing"),
        ("random_erasing:mask=box", "only random_erasing=<p> may follow it"),
        ("ppi:random_erasing=0.5", "random_erasing is the baseline's augmentation control"),
    ],
)
def test_a_bad_spec_is_named_with_its_bad_part(spec, message):
    with pytest.raises(VariantError, match=message.replace("(", r"\(").replace("[", r"\[")):
        variant(spec)


def test_methods_add_a_comparator_to_a_variant():
    assert split_comparator("ppi:mode=detached+dfr") == ("ppi:mode=detached", "dfr")
    assert split_comparator("ppi:w_con=1e+1") == ("ppi:w_con=1e+1", "erm")
    assert split_comparator("jtt") == ("baseline", "jtt")
    assert method_settings("ppi:partner=roll+dfr") == {
        "ppi": {"enabled": True, "partner": "roll"},
        "robust": {"method": "dfr"},
    }
    assert method_label("ppi:partner=roll+dfr") == "ppi_wbp:partner=roll+dfr"
    assert method_label("groupdro") == "groupdro"
    assert method_label("baseline+dfr") == "dfr"
    with pytest.raises(ValueError, match="after '\\+' comes one of groupdro, jtt, dfr"):
        method_settings("ppi+mixup")
