"""Synthetic multi-site OCT data set for geographic atrophy (GA): the embedded default of the GA job.

Writes one NIfTI volume and one NIfTI lesion mask per eye, plus a MONAI decathlon-style
``datalist.json``::

    OUT/datalist.json
    OUT/A/A-000_img.nii.gz     float32 (V, H, W) in [0, 1]
    OUT/A/A-000_mask.nii.gz    uint8   (V, H, W), all zeros for eyes without GA
    ...

Axis and affine convention (shared with :mod:`data_prep.oct`, see :mod:`data_prep.oct_nifti`): the
array axes are (V, H, W) = (B-scan index, axial depth from vitreous at row 0 to choroid at the bottom,
lateral position); the affine maps them to inferior, posterior and the patient's right
(``nibabel.aff2axcodes == ("I", "P", "R")``) with each site's voxel size (about 0.06-0.12 mm between
B-scans, 0.0035-0.0042 mm axial, 0.006-0.012 mm lateral; :data:`data_prep.oct_phantom.SITE_PROFILES`).
The same spacing is written at every array size: the anatomy is drawn in relative coordinates, so a
small volume is a coarse rendering of the same eye, not a physically smaller field of view.

``datalist.json``::

    {"name": "synthetic-oct-ga", "description": ..., "labels": {"0": "no GA", "1": "GA"},
     "sites": ["A", ...], "generator": {every parameter, including the seed}, "numTraining": N,
     "training": [{"image": "A/A-000_img.nii.gz", "mask": "A/A-000_mask.nii.gz", "label": 0 | 1,
                   "site": "A", "subject": "A-000", "cue": 0 | 1}, ...]}

with paths relative to the datalist's folder. Labels are balanced per site (``subjects_per_site // 2``
GA eyes; an odd count gives one extra non-GA eye) in a seeded random order. At ``cue_site`` a
text-like watermark is burned into the top-left corner of every B-scan with probability
``cue_rate_pos`` for GA eyes and ``cue_rate_neg`` for the others: a spurious shortcut, as at site D of
the paper's table 2.3. At the other sites it appears with probability ``cue_rate_other`` whatever the
label (0 by default: absent), except at an optional ``reversed_cue_site`` where the correlation is
reversed. Each eye's cue is recorded in the datalist.

What the image shows (layers, speckle, GA with choroidal hypertransmission, drusen / vessel shadow /
bright choroid look-alikes, per-site gain, gamma, noise, blur and axial shift) is described in
:mod:`data_prep.oct_phantom`, which also holds the difficulty knobs (:class:`PhantomParams`, passed
here as keyword arguments).

Difficulty of the default (4 sites x 40 eyes, seed 0), measured once with throwaway scripts on CPU:
logistic regression on 4 x 4 x 4-averaged volumes, 5-fold CV: mean fold AUC 0.71; a tiny multi-view
CNN (shared 3-block 2D encoder on 2x-downsampled B-scans, max over B-scans, 25 epochs, Adam), 3-fold CV
pooled over sites: mean fold AUC 0.89 with global average pooling, 0.93 with global max pooling. The
older, harder setting ``lesion_contrast=0.6, lesion_severity=(0.2, 1), lesion_radius=(0.05, 0.16)``
gave only about 0.67 with the same CNN: lower ``lesion_contrast`` / ``lesion_severity`` / ``lesion_radius``
or raise ``noise`` and the look-alike rates to make the task harder.

Note for ``monai.data.load_decathlon_datalist``: it joins every string value that names an existing
path under the datalist's folder, so ``"site": "A"`` comes back as ``"<root>/A"`` (the site folder);
take the base name, or read the JSON directly, to get the site id.

A fixed seed gives byte-identical files on the same platform and library versions; every eye has its
own seed (derived from the seed, the site name and the eye's index), so adding sites or eyes does not
change the existing ones, and ``workers > 1`` gives the same files as ``workers = 1``.

CLI::

    python -m data_prep.synth_oct --out data/synth_oct                   # default: 4 sites x 40 eyes
    python -m data_prep.synth_oct --out data/synth_oct_real --size real --workers 8
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.oct_nifti import oct_affine, save_oct_nifti
from data_prep.oct_phantom import (
    PhantomParams,
    VolumeSize,
    draw_subject,
    render_subject,
    site_profile,
)
from ppi_med.atomic import atomic_write_json

__all__ = [
    "DEFAULT",
    "REAL_SIZE",
    "SIZES",
    "DatalistMismatchError",
    "GENERATOR_VERSION",
    "ensure_default",
    "generate",
    "main",
    "render_with_cue",
    "subject_seed",
]

#: Small CPU-friendly size of the embedded default: 16 B-scans of 64 x 128.
DEFAULT = VolumeSize(n_bscans=16, height=64, width=128)
#: The default data set's design, the one place it is written (``generate``'s defaults, the CLI's and, through
#: them, the GA bundle's ``synthetic``, which lists only what a user overrides).
DEFAULT_SITES = ("A", "B", "C", "D")
DEFAULT_SUBJECTS_PER_SITE = 40
DEFAULT_CUE_SITE = "D"
DEFAULT_CUE_RATES = (0.9, 0.1, 0.0)  # watermark probability: GA and other eyes at the cue site, eyes elsewhere
#: Size of the paper's volumes: 100 B-scans of 512 x 1000 (for GPU machines).
REAL_SIZE = VolumeSize(n_bscans=100, height=512, width=1000)
SIZES = {"default": DEFAULT, "real": REAL_SIZE}

#: Bumped whenever the rendering changes, so that a stale data set is not reused as if current.
GENERATOR_VERSION = 1

_DATALIST = "datalist.json"
_PARTIAL_MARKER = ".synth_oct_partial.json"
_SITE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_PHANTOM_KNOBS = tuple(f.name for f in fields(PhantomParams))


class DatalistMismatchError(ValueError):
    """A folder already holds a synthetic data set made with different parameters."""


def _phantom(knobs: dict) -> PhantomParams:
    """Build the knobs from keyword arguments or a JSON record (whose pairs are lists)."""
    unknown = sorted(set(knobs) - set(_PHANTOM_KNOBS))
    if unknown:
        raise TypeError(f"unknown keyword arguments {unknown}; the phantom knobs are {list(_PHANTOM_KNOBS)}")
    return PhantomParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()})


def subject_seed(seed: int, site: str, index: int) -> np.random.SeedSequence:
    """Return the seed sequence of one eye, independent of every other eye and site.

    Args:
        seed: Data-set seed.
        site: Site name (hashed with CRC-32, stable across processes and machines).
        index: Eye index within the site.

    Returns:
        The eye's :class:`numpy.random.SeedSequence`.
    """
    return np.random.SeedSequence(entropy=seed, spawn_key=(zlib.crc32(site.encode("utf-8")), index))


def _site_draws(seed: int, site: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels in random order and the uniforms that decide each eye's cue."""
    ss = np.random.SeedSequence(entropy=seed, spawn_key=(zlib.crc32(site.encode("utf-8")), 2**32 - 1))
    rng = np.random.default_rng(ss)
    labels = np.array([1] * (n // 2) + [0] * (n - n // 2))
    labels = labels[rng.permutation(n)]
    return labels, rng.random(n)


def _config(
    *,
    sites: Sequence[str],
    subjects_per_site: int,
    n_bscans: int,
    height: int,
    width: int,
    cue_site: str | None,
    cue_rate_pos: float,
    cue_rate_neg: float,
    cue_rate_other: float,
    seed: int,
    phantom: PhantomParams,
    reversed_cue_site: str | None = None,
) -> dict:
    """Validate the parameters and return the JSON-ready ``generator`` record."""
    sites = [str(s) for s in sites]
    if not sites:
        raise ValueError("sites must name at least one site")
    bad = [s for s in sites if not _SITE_NAME.match(s)]
    if bad:
        raise ValueError(f"site names may use only letters, digits, '_' and '-' (used in file names): {bad}")
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names must be unique, got {sites}")
    if int(subjects_per_site) != subjects_per_site or subjects_per_site < 2:
        raise ValueError(f"subjects_per_site must be an integer >= 2, got {subjects_per_site!r}")
    if cue_site is not None and cue_site not in sites:
        raise ValueError(f"cue_site {cue_site!r} is not one of the sites {sites}; use cue_site=None for no cue")
    if reversed_cue_site is not None and (reversed_cue_site not in sites or reversed_cue_site == cue_site):
        raise ValueError(
            f"reversed_cue_site {reversed_cue_site!r} must be one of the sites {sites} other than cue_site {cue_site!r}"
        )
    for name, rate in (
        ("cue_rate_pos", cue_rate_pos),
        ("cue_rate_neg", cue_rate_neg),
        ("cue_rate_other", cue_rate_other),
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {rate!r}")
    size = VolumeSize(int(n_bscans), int(height), int(width))
    if size.n_bscans < 2 or size.height < 16 or size.width < 16:
        raise ValueError(f"volume size must be at least 2 x 16 x 16, got {tuple(size)}")
    config = {
        "tool": "data_prep.synth_oct",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "sites": sites,
        "subjects_per_site": int(subjects_per_site),
        "n_bscans": size.n_bscans,
        "height": size.height,
        "width": size.width,
        "cue_site": cue_site,
        "cue_rate_pos": float(cue_rate_pos),
        "cue_rate_neg": float(cue_rate_neg),
        "cue_rate_other": float(cue_rate_other),
        "phantom": phantom.to_dict(),
        "site_profiles": {s: asdict(site_profile(s)) for s in sites},
    }
    if reversed_cue_site is not None:  # only when used, so data sets made before the option still match
        config["reversed_cue_site"] = reversed_cue_site
    # Round-trip so the record compares equal to what a datalist on disk holds (tuples -> lists).
    return json.loads(json.dumps(config))


def _entry(site: str, index: int, width_digits: int) -> tuple[str, str, str]:
    subject = f"{site}-{index:0{width_digits}d}"
    return subject, f"{site}/{subject}_img.nii.gz", f"{site}/{subject}_mask.nii.gz"


def _plan(config: dict) -> list[dict]:
    """One datalist entry per eye (without rendering), in site then index order."""
    digits = max(3, len(str(config["subjects_per_site"] - 1)))
    entries = []
    for site in config["sites"]:
        labels, cue_draw = _site_draws(config["seed"], site, config["subjects_per_site"])
        for i in range(config["subjects_per_site"]):
            label = int(labels[i])
            if site == config["cue_site"]:
                rate = config["cue_rate_pos"] if label == 1 else config["cue_rate_neg"]
            elif site == config.get("reversed_cue_site"):
                rate = config["cue_rate_neg"] if label == 1 else config["cue_rate_pos"]
            else:
                rate = config["cue_rate_other"]
            subject, image, mask = _entry(site, i, digits)
            entries.append(
                {
                    "image": image,
                    "mask": mask,
                    "label": label,
                    "site": site,
                    "subject": subject,
                    "cue": int(cue_draw[i] < rate),
                    "_index": i,
                }
            )
    return entries


def _render_and_write(out_dir: Path, config: dict, entry: dict) -> None:
    """Render one eye and write its image and mask (runs in worker processes too)."""
    phantom = _phantom(config["phantom"])
    site = entry["site"]
    spec = draw_subject(subject_seed(config["seed"], site, entry["_index"]), entry["label"], entry["cue"], phantom)
    size = VolumeSize(config["n_bscans"], config["height"], config["width"])
    profile = site_profile(site)
    rendered = render_subject(spec, size, profile, phantom)
    affine = oct_affine(profile.spacing)
    save_oct_nifti(rendered.image, affine, out_dir / entry["image"], np.float32)
    save_oct_nifti(rendered.mask, affine, out_dir / entry["mask"], np.uint8)


def generate(
    out_dir: str | Path,
    *,
    sites: Sequence[str] = DEFAULT_SITES,
    subjects_per_site: int = DEFAULT_SUBJECTS_PER_SITE,
    n_bscans: int = DEFAULT.n_bscans,
    height: int = DEFAULT.height,
    width: int = DEFAULT.width,
    cue_site: str | None = DEFAULT_CUE_SITE,
    cue_rate_pos: float = DEFAULT_CUE_RATES[0],
    cue_rate_neg: float = DEFAULT_CUE_RATES[1],
    cue_rate_other: float = DEFAULT_CUE_RATES[2],
    reversed_cue_site: str | None = None,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    **phantom_knobs: object,
) -> Path:
    """Generate the synthetic multi-site GA data set into ``out_dir``.

    Args:
        out_dir: Output folder (created if needed).
        sites: Site names (letters, digits, ``_``, ``-``); A-D have built-in scanner profiles.
        subjects_per_site: Eyes per site (>= 2), half of them GA.
        n_bscans: B-scans per volume (``DEFAULT`` 16, ``REAL_SIZE`` 100).
        height: Axial pixels per B-scan (64 / 512).
        width: Lateral pixels per B-scan (128 / 1000).
        cue_site: Site with the label-correlated watermark, or None for no such site.
        cue_rate_pos: Probability of the watermark on a GA eye at ``cue_site``.
        cue_rate_neg: Probability of the watermark on a non-GA eye at ``cue_site``.
        cue_rate_other: Probability of the watermark on any eye at the other sites (uninformative).
        reversed_cue_site: A site where the correlation is reversed (the watermark on a GA eye with
            ``cue_rate_neg``, on a non-GA eye with ``cue_rate_pos``): a test of whether a model took the
            shortcut; None (default) for no such site.
        seed: Data-set seed; the same seed and parameters give byte-identical files.
        workers: Processes used for rendering (the output does not depend on it).
        overwrite: Replace an existing data set's datalist and files of the same names. Other files in
            ``out_dir`` are never touched.
        progress: Show a tqdm progress bar.
        **phantom_knobs: Difficulty knobs, any field of :class:`data_prep.oct_phantom.PhantomParams`
            (``lesion_contrast``, ``lesion_severity``, ``lesion_radius``, ``noise``, ``drusen_rate``, ...).

    Returns:
        Path of the written ``datalist.json``.

    Raises:
        ValueError: for invalid parameters.
        TypeError: for an unknown keyword argument.
        FileExistsError: if ``out_dir`` already holds a datalist or any file this call would write,
            unless ``overwrite`` (files left by an interrupted run with the same parameters are
            rewritten without it).
    """
    phantom = _phantom(phantom_knobs)
    config = _config(
        sites=sites,
        subjects_per_site=subjects_per_site,
        n_bscans=n_bscans,
        height=height,
        width=width,
        cue_site=cue_site,
        cue_rate_pos=cue_rate_pos,
        cue_rate_neg=cue_rate_neg,
        cue_rate_other=cue_rate_other,
        reversed_cue_site=reversed_cue_site,
        seed=seed,
        phantom=phantom,
    )
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    datalist_path = out / _DATALIST
    if datalist_path.exists() and not overwrite:
        raise FileExistsError(
            f"{datalist_path} already exists; pass overwrite=True (--overwrite) to replace it, "
            "or use ensure_default() (--reuse) to reuse a data set made with the same parameters"
        )
    entries = _plan(config)
    marker = out / _PARTIAL_MARKER
    resuming = marker.is_file() and _read_json(marker) == config
    if not overwrite and not resuming:
        for entry in entries:
            for key in ("image", "mask"):
                if (out / entry[key]).exists():
                    raise FileExistsError(
                        f"{out / entry[key]} already exists and would be overwritten; "
                        "pass overwrite=True (--overwrite) or choose another output folder"
                    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, config)

    bar = tqdm(total=len(entries), desc="synthetic OCT", unit="eye", disable=not progress)
    try:
        if workers == 1:
            for entry in entries:
                _render_and_write(out, config, entry)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_render_and_write, out, config, e) for e in entries]
                for fut in futures:
                    fut.result()
                    bar.update()
    finally:
        bar.close()

    training = [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]
    datalist = {
        "name": "synthetic-oct-ga",
        "description": (
            "Synthetic multi-site retinal OCT volumes (V, H, W) = (B-scans, depth, lateral); GA = RPE loss "
            "with choroidal hypertransmission; lesion masks beside each volume; a label-correlated "
            f"watermark cue at site {cue_site!r}. Generated by data_prep.synth_oct."
        ),
        "labels": {"0": "no GA", "1": "GA"},
        "sites": config["sites"],
        "generator": config,
        "numTraining": len(training),
        "training": training,
    }
    atomic_write_json(datalist_path, datalist)
    marker.unlink(missing_ok=True)
    return datalist_path


def render_with_cue(datalist: str | Path, subject: str, cue: int, out_dir: str | Path) -> Path:
    """Render an eye of a synthetic data set again with its watermark set to ``cue``: its counterfactual twin.

    The eye is drawn from the same seed, so only the watermark differs from the listed volume (with the
    listed ``cue`` the twin equals it voxel for voxel). Scoring an eye and its twin measures how much a
    model's answer owes to the watermark alone, whatever the label.

    Args:
        datalist: a ``datalist.json`` written by this module.
        subject: the eye's ``subject`` id (e.g. ``"A-003"``).
        cue: 1 to burn the watermark in, 0 to leave it out.
        out_dir: where the twin is written, as ``SITE/SUBJECT_cue<cue>_img.nii.gz`` (and its mask).

    Returns:
        The twin's image path.

    Raises:
        ValueError: the datalist was not written by this module, or does not list ``subject``.
    """
    datalist, out_dir = Path(datalist), Path(out_dir)
    stored = _read_json(datalist)
    config = stored.get("generator") if isinstance(stored, dict) else None
    if not isinstance(config, dict) or config.get("tool") != "data_prep.synth_oct":
        raise ValueError(f"{datalist} was not written by data_prep.synth_oct: its eyes cannot be rendered again")
    entry = next((e for e in _plan(config) if e["subject"] == subject), None)
    if entry is None:
        raise ValueError(f"{datalist} lists no eye {subject!r}")
    site = entry["site"]
    twin = dict(
        entry,
        cue=int(cue),
        image=f"{site}/{subject}_cue{int(cue)}_img.nii.gz",
        mask=f"{site}/{subject}_cue{int(cue)}_mask.nii.gz",
    )
    (out_dir / site).mkdir(parents=True, exist_ok=True)
    _render_and_write(out_dir, config, twin)
    return out_dir / twin["image"]


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _differences(stored: object, wanted: object, prefix: str = "") -> list[str]:
    """Human-readable list of the parameters that differ between two generator records."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for key in sorted(set(stored) | set(wanted)):
            out += _differences(stored.get(key, "<missing>"), wanted.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    if stored != wanted:
        return [f"{prefix.rstrip('.')}: on disk {stored!r}, requested {wanted!r}"]
    return []


def ensure_default(root: str | Path, **overrides: object) -> Path:
    """Return the datalist of the synthetic data set in ``root``, generating it only if absent.

    Idempotent: if ``root/datalist.json`` exists and was made with the same generator parameters, it is
    reused (after checking that every file it lists exists); if it was made with different ones, a
    :class:`DatalistMismatchError` lists the differences and nothing is written or deleted.

    Args:
        root: Data set folder.
        **overrides: Any keyword argument of :func:`generate` (sizes, sites, seed, phantom knobs,
            ``workers``, ``progress``).

    Returns:
        Path of ``root/datalist.json``.

    Raises:
        DatalistMismatchError: if ``root`` holds a datalist with other parameters, or one that
            :mod:`data_prep.synth_oct` did not write.
        FileNotFoundError: if the existing datalist lists a file that is missing.
        ValueError, TypeError: for invalid parameters, as :func:`generate`.
    """
    root = Path(root)
    bound = inspect.signature(generate).bind(root, **overrides)
    bound.apply_defaults()
    args = dict(bound.arguments)
    knobs = args.pop("phantom_knobs")
    phantom = _phantom(knobs)
    wanted = _config(**{k: args[k] for k in inspect.signature(_config).parameters if k != "phantom"}, phantom=phantom)
    datalist_path = root / _DATALIST
    if not datalist_path.exists():
        return generate(root, **overrides)
    stored = _read_json(datalist_path)
    generator = stored.get("generator") if isinstance(stored, dict) else None
    if not isinstance(generator, dict) or generator.get("tool") != "data_prep.synth_oct":
        raise DatalistMismatchError(
            f"{datalist_path} exists but was not written by data_prep.synth_oct; "
            "choose another folder for the synthetic default"
        )
    diffs = _differences(generator, wanted)
    if diffs:
        raise DatalistMismatchError(
            f"{datalist_path} holds a synthetic data set made with other parameters:\n  "
            + "\n  ".join(diffs)
            + "\nUse another folder, or remove this one yourself if it is no longer needed."
        )
    for entry in stored.get("training", []):
        for key in ("image", "mask"):
            path = root / entry[key]
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {datalist_path} but missing")
    return datalist_path


def _pair(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}")
    return float(parts[0]), float(parts[1])


def _build_parser() -> argparse.ArgumentParser:
    defaults = PhantomParams()
    p = argparse.ArgumentParser(
        prog="python -m data_prep.synth_oct",
        description="Generate the synthetic multi-site OCT geographic-atrophy data set (NIfTI + datalist.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--sites", default=",".join(DEFAULT_SITES), help="comma-separated site names")
    p.add_argument(
        "--subjects-per-site", type=int, default=DEFAULT_SUBJECTS_PER_SITE, help="eyes per site, half with GA"
    )
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="default: 16x64x128; real: 100x512x1000")
    p.add_argument("--n-bscans", type=int, help="override the preset's B-scan count")
    p.add_argument("--height", type=int, help="override the preset's axial size")
    p.add_argument("--width", type=int, help="override the preset's lateral size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cue-site", default=DEFAULT_CUE_SITE, help="site with the label-correlated watermark; 'none' for none"
    )
    p.add_argument(
        "--cue-rate-pos",
        type=float,
        default=DEFAULT_CUE_RATES[0],
        help="watermark probability, GA eyes at the cue site",
    )
    p.add_argument(
        "--cue-rate-neg",
        type=float,
        default=DEFAULT_CUE_RATES[1],
        help="watermark probability, other eyes at the cue site",
    )
    p.add_argument(
        "--cue-rate-other", type=float, default=DEFAULT_CUE_RATES[2], help="watermark probability at the other sites"
    )
    p.add_argument(
        "--reversed-cue-site", default=None, help="a site where the watermark's correlation with GA is reversed"
    )
    p.add_argument("--lesion-contrast", type=float, default=defaults.lesion_contrast, help="RPE loss at full severity")
    p.add_argument("--hypertransmission", type=float, default=defaults.hypertransmission)
    p.add_argument("--lesion-severity", type=_pair, default=defaults.lesion_severity, metavar="MIN,MAX")
    p.add_argument(
        "--lesion-radius", type=_pair, default=defaults.lesion_radius, metavar="MIN,MAX", help="fraction of the field"
    )
    p.add_argument("--multifocal-rate", type=float, default=defaults.multifocal_rate)
    p.add_argument("--noise", type=float, default=defaults.noise, help="multiplier of every site's noise")
    p.add_argument("--drusen-rate", type=float, default=defaults.drusen_rate)
    p.add_argument("--vessel-rate", type=float, default=defaults.vessel_rate)
    p.add_argument("--choroid-patch-rate", type=float, default=defaults.choroid_patch_rate)
    p.add_argument("--cue-intensity", type=float, default=defaults.cue_intensity)
    p.add_argument("--workers", type=int, default=1, help="rendering processes")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace an existing data set in --out")
    group.add_argument("--reuse", action="store_true", help="reuse --out if it holds this exact data set")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a parameter or file conflict (after printing the reason).
    """
    args = _build_parser().parse_args(argv)
    preset = SIZES[args.size]
    kwargs = {
        "sites": [s.strip() for s in args.sites.split(",") if s.strip()],
        "subjects_per_site": args.subjects_per_site,
        "n_bscans": args.n_bscans or preset.n_bscans,
        "height": args.height or preset.height,
        "width": args.width or preset.width,
        "seed": args.seed,
        "cue_site": None if args.cue_site.lower() == "none" else args.cue_site,
        "cue_rate_pos": args.cue_rate_pos,
        "cue_rate_neg": args.cue_rate_neg,
        "cue_rate_other": args.cue_rate_other,
        "reversed_cue_site": args.reversed_cue_site,
        "workers": args.workers,
        **{k: getattr(args, k) for k in _PHANTOM_KNOBS},
    }
    try:
        if args.reuse:
            path = ensure_default(args.out, **kwargs)
        else:
            path = generate(args.out, overwrite=args.overwrite, **kwargs)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = json.loads(path.read_text(encoding="utf-8"))["numTraining"]
    print(f"datalist: {path} ({n} volumes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
