"""Data the study's jobs share, made once before they start (so parallel jobs never build it twice)."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

from .paths import BUNDLES, ROOT
from .profiles import Profile

__all__ = ["prepare_data", "synthetic_overrides"]


def prepare_data(out: Path, profile: Profile, parts: Sequence[str]) -> None:
    """Make the data sets of the chosen parts under ``out/data`` (GA) or the bundle's default place (LIDC).

    The GA data sets are made by the bundle's own default path on first use; here they are built up front
    by the same function. The LIDC data is the bundle's default phantom, or for the small profile three
    phantom patients with every third slice.

    Args:
        out: the study folder.
        profile: the sizes (its GA overrides say which synthetic data each GA part trains on).
        parts: the chosen parts.
    """
    from data_prep.defaults import ga_datalist

    if {"ga", "saliency", "sites"} & set(parts):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(ROOT / BUNDLES["ga"]))
        synthetic = dict(parser.get("synthetic"))
        sets = {"ga": profile.ga, "ga_sites": profile.sites, "ga_sites_rev": profile.confounded}
        for name, extra in sets.items():
            if name == "ga" and not {"ga", "saliency"} & set(parts) or name != "ga" and "sites" not in parts:
                continue
            spec = dict(synthetic, **synthetic_overrides(extra))
            folder = out / "data" / name
            ga_datalist(folder, folder, **spec)
    if "lidc" in parts:
        if profile.lidc_data == "small":
            from data_prep.lidc import preprocess
            from data_prep.lidc_phantom import TEST_PATIENTS, TEST_SLICE_STEP, write_phantom

            patients = [*TEST_PATIENTS, "LIDC-IDRI-0749"]
            root = out / "data" / "lidc"
            write_phantom(root / "dicom", patients, slice_step=TEST_SLICE_STEP, progress=False)
            preprocess(root / "dicom", root / "patches", patients=patients, folds=profile.lidc_folds, progress=False)
        else:
            from data_prep.defaults import lidc_datalist

            lidc_datalist(ROOT / "data" / "lidc_phantom", ROOT / "data" / "lidc_phantom")


def synthetic_overrides(argv: Sequence[str]) -> dict:
    """``--synthetic#key value`` pairs of an override list, parsed as the bundle CLI parses them.

    Args:
        argv: bundle overrides, ``--key value`` pairs.

    Returns:
        ``{key: value}`` of the ``--synthetic#`` ones, values read as Python literals where they are.
    """
    found = {}
    for key, value in zip(argv[::1], argv[1::1]):
        if key.startswith("--synthetic#"):
            try:
                found[key[len("--synthetic#") :]] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                found[key[len("--synthetic#") :]] = value
    return found
