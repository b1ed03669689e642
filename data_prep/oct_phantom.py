"""Synthetic retinal OCT phantom: one (V, H, W) volume with layers, speckle, GA lesions and look-alikes.

This module draws and renders one subject; :mod:`data_prep.synth_oct` turns many subjects into a
multi-site data set on disk. Geometry is drawn in relative coordinates so that the same subject can be
rendered at the small CPU size (16 x 64 x 128) or the real size (100 x 512 x 1000):

* en-face position ``(v, u)`` in ``[0, 1]^2``: ``v`` across B-scans, ``u`` along a B-scan (lateral);
  the scan field is taken as square, so a circle in ``(v, u)`` is a circle on the fundus;
* depth ``y`` in ``[0, 1]`` from the top of a B-scan (vitreous) to its bottom (choroid / sclera).

Anatomy, from the top: vitreous (dark); nerve fibre layer (bright, thicker on the nasal side); ganglion
cell layer; inner plexiform layer (bright); inner nuclear layer (dark); outer plexiform layer (bright);
outer nuclear layer (dark, thicker at the fovea); ellipsoid zone (bright); interdigitation zone; retinal
pigment epithelium (RPE, the brightest band); Bruch's membrane; choroid (textured, attenuated with
depth); sclera. The inner layers thin into a foveal pit; the whole stack follows a tilted, curved RPE.

Geographic atrophy (GA), the positive class: one or more en-face footprints (irregular ellipses, size
drawn from ``lesion_radius``) inside which the RPE, ellipsoid and interdigitation bands fade, the outer
nuclear layer thins, and the choroid below becomes brighter and is less attenuated (choroidal
hypertransmission, light no longer absorbed by the RPE). The ground-truth mask is the RPE +
hypertransmission region (from the top of the RPE band to the bottom of the choroid) inside the
footprints.

Benign look-alikes, drawn at the same rate in both classes so that none of them is a label cue:
drusen (dome-shaped RPE elevations over medium-reflective material, with a slight shadow below),
retinal vessel shadows (vertical dark stripes through the RPE and choroid: RPE dimming without
hypertransmission) and bright choroidal patches (choroid brightening under an intact RPE). Only the
conjunction "RPE loss with brighter choroid below" identifies GA.

Acquisition (per site, :class:`SiteProfile`): multiplicative gamma speckle, Gaussian blur, gain, display
gamma, additive noise and an axial shift of the retina. The spurious cue is a text-like bright
watermark block in the top-left corner of every B-scan, burned in after blurring.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "Anatomy",
    "Lesion",
    "Blob",
    "VesselShadow",
    "PhantomParams",
    "RenderedVolume",
    "SiteProfile",
    "SITE_PROFILES",
    "SubjectSpec",
    "VolumeSize",
    "cue_box",
    "draw_subject",
    "render_subject",
    "site_profile",
]


class VolumeSize(NamedTuple):
    """Array size of one OCT volume: B-scans x axial depth x lateral A-scans."""

    n_bscans: int
    height: int
    width: int


# Sizes the geometry and the site blur are tuned at; other sizes scale from these.
_REF_HEIGHT = 64
_REF_WIDTH = 128


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition characteristics of one clinic's scanner.

    Attributes:
        gain: Multiplicative brightness applied after speckle and blur.
        gamma: Display gamma (``x ** gamma``); < 1 lifts dark tissue, > 1 darkens it.
        speckle_looks: Shape of the unit-mean gamma speckle; lower is grainier.
        noise_sigma: Standard deviation of the additive Gaussian noise (intensity units).
        blur: Gaussian sigma (axial, lateral) in pixels of the 64 x 128 reference B-scan; scaled with size.
        axial_shift: Offset of the retina in depth, as a fraction of the B-scan height (+ is deeper).
        spacing: Voxel size (between B-scans, axial, lateral) in mm written into the NIfTI affine.
    """

    gain: float
    gamma: float
    speckle_looks: float
    noise_sigma: float
    blur: tuple[float, float]
    axial_shift: float
    spacing: tuple[float, float, float]


#: Built-in scanner profiles for sites A-D; other site names get :func:`site_profile`'s derived ones.
SITE_PROFILES: dict[str, SiteProfile] = {
    "A": SiteProfile(1.00, 1.00, 5.0, 0.015, (0.6, 0.6), 0.00, (0.060, 0.0039, 0.0060)),
    "B": SiteProfile(0.85, 0.90, 3.5, 0.030, (1.0, 1.2), 0.06, (0.120, 0.0039, 0.0117)),
    "C": SiteProfile(1.12, 1.10, 6.0, 0.020, (0.5, 0.9), -0.05, (0.063, 0.0035, 0.0070)),
    "D": SiteProfile(0.95, 1.05, 4.0, 0.025, (0.8, 0.5), 0.03, (0.094, 0.0042, 0.0090)),
}


def site_profile(site: str) -> SiteProfile:
    """Return the scanner profile of a site.

    Sites A-D use :data:`SITE_PROFILES`; any other name gets a profile drawn from a generator seeded
    by the CRC-32 of the name, so a site looks the same in every data set and on every machine.

    Args:
        site: Site name.

    Returns:
        The site's :class:`SiteProfile`.
    """
    if site in SITE_PROFILES:
        return SITE_PROFILES[site]
    rng = np.random.default_rng(zlib.crc32(site.encode("utf-8")))
    return SiteProfile(
        gain=round(float(rng.uniform(0.85, 1.12)), 3),
        gamma=round(float(rng.uniform(0.9, 1.1)), 3),
        speckle_looks=round(float(rng.uniform(3.5, 6.0)), 2),
        noise_sigma=round(float(rng.uniform(0.015, 0.03)), 4),
        blur=(round(float(rng.uniform(0.4, 1.0)), 2), round(float(rng.uniform(0.5, 1.2)), 2)),
        axial_shift=round(float(rng.uniform(-0.05, 0.06)), 3),
        spacing=(
            round(float(rng.uniform(0.06, 0.12)), 4),
            round(float(rng.uniform(0.0035, 0.0042)), 5),
            round(float(rng.uniform(0.006, 0.012)), 5),
        ),
    )


@dataclass(frozen=True)
class PhantomParams:
    """Difficulty knobs of the phantom (the defaults give the embedded default data set).

    Attributes:
        lesion_contrast: Fraction of the RPE/ellipsoid signal lost at the core of a full-severity lesion;
            the choroid below brightens by ``hypertransmission * lesion_contrast`` times its level.
        hypertransmission: Choroidal brightening per unit of RPE loss.
        lesion_severity: Range of the per-lesion severity (uniform), multiplying ``lesion_contrast``;
            low values give subtle lesions, which is what keeps the task from being trivial.
        lesion_radius: Range of a lesion's en-face semi-axes, as a fraction of the scan field
            (0.1 of a 6 mm field is 0.6 mm).
        multifocal_rate: Probability that a GA eye has a second lesion.
        noise: Multiplier of each site's speckle and additive noise (speckle looks are divided by
            ``noise ** 2``).
        drusen_rate: Expected number of drusen per eye (Poisson), in both classes.
        vessel_rate: Expected number of retinal vessel shadows per eye (Poisson), in both classes.
        choroid_patch_rate: Expected number of bright choroidal patches per eye (Poisson), both classes.
        cue_intensity: Brightness of the spurious watermark block.
    """

    lesion_contrast: float = 0.8
    hypertransmission: float = 1.3
    lesion_severity: tuple[float, float] = (0.3, 1.0)
    lesion_radius: tuple[float, float] = (0.08, 0.2)
    multifocal_rate: float = 0.25
    noise: float = 1.0
    drusen_rate: float = 1.5
    vessel_rate: float = 2.0
    choroid_patch_rate: float = 1.0
    cue_intensity: float = 0.8

    def __post_init__(self) -> None:
        """Validate ranges so that a bad knob fails before anything is written."""
        checks = {
            "lesion_contrast": 0.0 <= self.lesion_contrast <= 1.0,
            "hypertransmission": self.hypertransmission >= 0.0,
            "lesion_severity": 0.0 <= self.lesion_severity[0] <= self.lesion_severity[1] <= 1.0,
            "lesion_radius": 0.0 < self.lesion_radius[0] <= self.lesion_radius[1] <= 0.5,
            "multifocal_rate": 0.0 <= self.multifocal_rate <= 1.0,
            "noise": self.noise > 0.0,
            "drusen_rate": self.drusen_rate >= 0.0,
            "vessel_rate": self.vessel_rate >= 0.0,
            "choroid_patch_rate": self.choroid_patch_rate >= 0.0,
            "cue_intensity": 0.0 <= self.cue_intensity <= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"PhantomParams out of range: {values}")

    def to_dict(self) -> dict:
        """Return the knobs as JSON-ready plain types (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Anatomy:
    """Healthy retinal geometry of one eye, in relative units (see the module docstring)."""

    rpe_depth: float
    tilt_u: float
    tilt_v: float
    curvature: float
    fovea: tuple[float, float]
    pit_depth: float
    pit_width: float
    thickness_scale: float
    nasal_side: int
    choroid_thickness: float
    choroid_attenuation: float
    intensity_scale: tuple[float, ...]


@dataclass(frozen=True)
class Lesion:
    """One GA footprint: an irregular ellipse centred at ``centre`` = (v, u)."""

    centre: tuple[float, float]
    radii: tuple[float, float]
    angle: float
    harmonics: tuple[float, ...]
    severity: float


@dataclass(frozen=True)
class Blob:
    """A round en-face feature (drusen, bright choroidal patch) with an amplitude."""

    centre: tuple[float, float]
    radius: float
    amplitude: float


@dataclass(frozen=True)
class VesselShadow:
    """A straight retinal vessel across the en-face plane that shadows everything below it."""

    point: tuple[float, float]
    angle: float
    width: float
    strength: float


@dataclass(frozen=True)
class SubjectSpec:
    """Everything that defines one synthetic eye except the pixel noise (drawn at render time).

    Attributes:
        label: 1 for GA, 0 for no GA.
        cue: 1 when the spurious watermark is burned in.
        anatomy: Healthy geometry.
        lesions: GA footprints (empty for label 0).
        drusen: Drusen (benign).
        vessels: Vessel shadows (benign).
        choroid_patches: Bright choroidal patches (benign).
        noise_seed: Seed of the speckle / texture / additive noise stream.
    """

    label: int
    cue: int
    anatomy: Anatomy
    lesions: tuple[Lesion, ...]
    drusen: tuple[Blob, ...]
    vessels: tuple[VesselShadow, ...]
    choroid_patches: tuple[Blob, ...]
    noise_seed: int = field(default=0)


class RenderedVolume(NamedTuple):
    """A rendered eye: image, lesion mask and the layer surfaces used to draw them.

    Attributes:
        image: float32 (V, H, W) in [0, 1].
        mask: uint8 (V, H, W); 1 on the RPE + hypertransmission voxels inside the GA footprints.
        ilm: float (V, W) depth in pixels of the inner limiting membrane (top of the retina).
        rpe_top: float (V, W) depth in pixels of the top of the RPE band.
        bruch: float (V, W) depth in pixels of Bruch's membrane (bottom of the RPE band).
        choroid_bottom: float (V, W) depth in pixels of the choroid-sclera boundary.
        footprint: float (V, W) in [0, 1], the soft GA footprint (max over lesions, severity excluded).
    """

    image: np.ndarray
    mask: np.ndarray
    ilm: np.ndarray
    rpe_top: np.ndarray
    bruch: np.ndarray
    choroid_bottom: np.ndarray
    footprint: np.ndarray


# Layer stack above the RPE, from the RPE upwards: name, thickness (fraction of height), intensity,
# and whether the layer belongs to the inner retina (thins into the foveal pit).
_LAYERS: tuple[tuple[str, float, float, bool], ...] = (
    ("interdigitation", 0.018, 0.45, False),
    ("ellipsoid", 0.018, 0.78, False),
    ("onl", 0.085, 0.13, False),
    ("opl", 0.022, 0.52, True),
    ("inl", 0.038, 0.24, True),
    ("ipl", 0.036, 0.55, True),
    ("gcl", 0.040, 0.36, True),
    ("nfl", 0.0, 0.74, True),  # thickness varies laterally, see _render_geometry
)
_RPE_THICKNESS = 0.035
_RPE_INTENSITY = 0.97
_VITREOUS = 0.035
_DRUSEN_MATERIAL = 0.55
_CHOROID = 0.55
_SCLERA = 0.16
_N_INTENSITIES = len(_LAYERS) + 2  # layers + RPE + choroid

# Watermark geometry as fractions of (height, width): rows and columns of the top-left block.
_CUE_ROWS = (0.02, 0.10)
_CUE_COLS = (0.03, 0.16)


def cue_box(height: int, width: int) -> tuple[slice, slice]:
    """Return the (rows, columns) of a B-scan covered by the spurious watermark block.

    Args:
        height: B-scan height in pixels.
        width: B-scan width in pixels.

    Returns:
        Row and column slices (always at least 2 x 2 pixels), in the vitreous above any retina.
    """
    r0 = int(math.floor(_CUE_ROWS[0] * height))
    r1 = max(r0 + 2, int(math.ceil(_CUE_ROWS[1] * height)))
    c0 = int(math.floor(_CUE_COLS[0] * width))
    c1 = max(c0 + 2, int(math.ceil(_CUE_COLS[1] * width)))
    return slice(r0, r1), slice(c0, c1)


def _draw_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        rpe_depth=float(rng.uniform(0.60, 0.66)),
        tilt_u=float(rng.uniform(-0.08, 0.08)),
        tilt_v=float(rng.uniform(-0.04, 0.04)),
        curvature=float(rng.uniform(0.05, 0.25)),
        fovea=(float(rng.uniform(0.4, 0.6)), float(rng.uniform(0.4, 0.6))),
        pit_depth=float(rng.uniform(0.6, 0.9)),
        pit_width=float(rng.uniform(0.08, 0.13)),
        thickness_scale=float(rng.uniform(0.9, 1.1)),
        nasal_side=int(rng.choice([-1, 1])),
        choroid_thickness=float(rng.uniform(0.13, 0.20)),
        choroid_attenuation=float(rng.uniform(0.10, 0.16)),
        intensity_scale=tuple(float(x) for x in rng.uniform(0.92, 1.08, size=_N_INTENSITIES)),
    )


def _draw_lesion(rng: np.random.Generator, params: PhantomParams, anatomy: Anatomy) -> Lesion:
    lo, hi = params.lesion_radius
    radii = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    # GA usually spares the foveal centre at first and grows around it: keep centres near the macula.
    centre = (
        float(np.clip(anatomy.fovea[0] + rng.normal(0.0, 0.15), 0.15, 0.85)),
        float(np.clip(anatomy.fovea[1] + rng.normal(0.0, 0.15), 0.15, 0.85)),
    )
    severity = float(rng.uniform(*params.lesion_severity))
    return Lesion(
        centre=centre,
        radii=radii,
        angle=float(rng.uniform(0, math.pi)),
        harmonics=tuple(float(x) for x in rng.normal(0.0, 0.08, size=6)),
        severity=severity,
    )


def _draw_blobs(
    rng: np.random.Generator, rate: float, radius: tuple[float, float], amplitude: tuple[float, float]
) -> tuple[Blob, ...]:
    count = int(rng.poisson(rate))
    return tuple(
        Blob(
            centre=(float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.1, 0.9))),
            radius=float(rng.uniform(*radius)),
            amplitude=float(rng.uniform(*amplitude)),
        )
        for _ in range(count)
    )


def _draw_vessels(rng: np.random.Generator, rate: float) -> tuple[VesselShadow, ...]:
    count = int(rng.poisson(rate))
    return tuple(
        VesselShadow(
            point=(float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.1, 0.9))),
            angle=float(rng.uniform(0, math.pi)),
            width=float(rng.uniform(0.006, 0.016)),
            strength=float(rng.uniform(0.35, 0.7)),
        )
        for _ in range(count)
    )


def draw_subject(seed_sequence: np.random.SeedSequence, label: int, cue: int, params: PhantomParams) -> SubjectSpec:
    """Draw one eye's anatomy, lesions and look-alikes.

    Each part comes from its own child stream of ``seed_sequence``, so the healthy anatomy and the
    look-alikes of an eye do not depend on its label: removing the lesions of a GA eye gives a
    plausible healthy eye with the same layers, which the tests use to isolate the lesion's effect.

    Args:
        seed_sequence: Seed of this subject.
        label: 1 for GA (one lesion, a second with ``params.multifocal_rate``), 0 for none.
        cue: 1 to burn in the spurious watermark.
        params: Difficulty knobs.

    Returns:
        The subject specification.

    Raises:
        ValueError: if label or cue is not 0 or 1.
    """
    if label not in (0, 1) or cue not in (0, 1):
        raise ValueError(f"label and cue must be 0 or 1, got label={label!r}, cue={cue!r}")
    anatomy_ss, lesion_ss, lookalike_ss, noise_ss = seed_sequence.spawn(4)
    anatomy = _draw_anatomy(np.random.default_rng(anatomy_ss))
    lesion_rng = np.random.default_rng(lesion_ss)
    lesions: tuple[Lesion, ...] = ()
    if label == 1:
        n_lesions = 2 if lesion_rng.random() < params.multifocal_rate else 1
        lesions = tuple(_draw_lesion(lesion_rng, params, anatomy) for _ in range(n_lesions))
    look = np.random.default_rng(lookalike_ss)
    drusen = _draw_blobs(look, params.drusen_rate, (0.02, 0.06), (0.015, 0.04))
    vessels = _draw_vessels(look, params.vessel_rate)
    patches = _draw_blobs(look, params.choroid_patch_rate, (0.04, 0.12), (0.4, 1.0))
    noise_seed = int(noise_ss.generate_state(1, dtype=np.uint64)[0])
    return SubjectSpec(label, cue, anatomy, lesions, drusen, vessels, patches, noise_seed)


def _lesion_footprint(lesion: Lesion, vv: np.ndarray, uu: np.ndarray) -> np.ndarray:
    """Soft footprint in [0, 1] of an irregular ellipse, 0.5 on its boundary."""
    dv, du = vv - lesion.centre[0], uu - lesion.centre[1]
    c, s = math.cos(lesion.angle), math.sin(lesion.angle)
    a = (c * dv + s * du) / lesion.radii[0]
    b = (-s * dv + c * du) / lesion.radii[1]
    rho = np.sqrt(a * a + b * b)
    theta = np.arctan2(b, a)
    # Low-order harmonics make the border lobulated, as GA borders are.
    wobble = np.ones_like(rho)
    for k, amp in enumerate(lesion.harmonics, start=2):
        phase = 0.7 * k
        wobble += amp * np.cos(k * theta + phase)
    edge = 0.12
    return 1.0 / (1.0 + np.exp((rho - wobble) / edge))


def _blob(blob: Blob, vv: np.ndarray, uu: np.ndarray) -> np.ndarray:
    d2 = ((vv - blob.centre[0]) ** 2 + (uu - blob.centre[1]) ** 2) / blob.radius**2
    return np.exp(-0.5 * d2 * 4.0)


def _ramp(x: np.ndarray) -> np.ndarray:
    """Anti-aliased step: 0 well above a boundary, 1 well below it (x in pixels)."""
    return np.clip(x + np.float32(0.5), np.float32(0.0), np.float32(1.0))


def render_subject(spec: SubjectSpec, size: VolumeSize, profile: SiteProfile, params: PhantomParams) -> RenderedVolume:
    """Render one eye at a given size with a site's acquisition profile.

    Args:
        spec: The subject (from :func:`draw_subject`).
        size: Output array size.
        profile: The site's scanner profile.
        params: Difficulty knobs (contrast, hypertransmission, noise, cue brightness).

    Returns:
        The image, lesion mask and layer surfaces.

    Raises:
        ValueError: if any dimension of ``size`` is below 2 or the height is too small for the layers.
    """
    n_v, height, width = (int(x) for x in size)
    if n_v < 2 or height < 16 or width < 16:
        raise ValueError(f"volume size must be at least 2 x 16 x 16, got {tuple(size)}")
    rng = np.random.default_rng(spec.noise_seed)
    an = spec.anatomy
    scale_h = height / _REF_HEIGHT
    scale_w = width / _REF_WIDTH

    # En-face grid (V, W) of pixel centres.
    v = (np.arange(n_v) + 0.5) / n_v
    u = (np.arange(width) + 0.5) / width
    vv, uu = np.meshgrid(v, u, indexing="ij")

    # GA footprint: geometric f (for the mask) and severity-weighted F (for the image).
    footprint = np.zeros((n_v, width))
    weighted = np.zeros((n_v, width))
    for lesion in spec.lesions:
        f = _lesion_footprint(lesion, vv, uu)
        footprint = np.maximum(footprint, f)
        weighted = np.maximum(weighted, lesion.severity * f)
    loss = params.lesion_contrast * weighted  # fraction of RPE / photoreceptor signal lost

    elevation = np.zeros((n_v, width))
    for d in spec.drusen:
        d2 = ((vv - d.centre[0]) ** 2 + (uu - d.centre[1]) ** 2) / d.radius**2
        elevation = np.maximum(elevation, d.amplitude * np.sqrt(np.clip(1.0 - d2, 0.0, None)))
    shadow = np.zeros((n_v, width))
    for ves in spec.vessels:
        dist = np.abs(-(vv - ves.point[0]) * math.sin(ves.angle) + (uu - ves.point[1]) * math.cos(ves.angle))
        shadow = np.maximum(shadow, ves.strength * np.exp(-0.5 * (dist / ves.width) ** 2))
    patch = np.zeros((n_v, width))
    for p in spec.choroid_patches:
        patch = np.maximum(patch, p.amplitude * _blob(p, vv, uu))

    # Surfaces in relative depth, then pixels.
    du, dv = uu - 0.5, vv - 0.5
    bruch_rel = (
        an.rpe_depth
        + profile.axial_shift
        + _RPE_THICKNESS / 2
        + an.tilt_u * du
        + an.tilt_v * dv
        - an.curvature * (du**2 + 0.6 * dv**2)
    )
    fovea_g = np.exp(-0.5 * ((vv - an.fovea[0]) ** 2 + (uu - an.fovea[1]) ** 2) / an.pit_width**2)
    inner_scale = 1.0 - an.pit_depth * fovea_g
    nfl = 0.012 + 0.03 / (1.0 + np.exp(-an.nasal_side * (uu - an.fovea[1]) / 0.08))

    bruch = bruch_rel * height
    rpe_bottom = bruch - elevation * height
    rpe_top = rpe_bottom - _RPE_THICKNESS * height
    boundaries = []  # top surface of each layer of _LAYERS, from the RPE upwards
    top = rpe_top.copy()
    for name, thick, _, inner in _LAYERS:
        t = nfl if name == "nfl" else np.full_like(top, thick)
        t = t * an.thickness_scale
        if inner:
            t = t * inner_scale
        if name == "onl":
            t = (t + 0.035 * fovea_g) * (1.0 - 0.45 * loss)  # thicker at the fovea, thins over GA
        top = top - t * height
        boundaries.append(top)
    ilm = top
    choroid_bottom = bruch + an.choroid_thickness * height

    # Per-column layer intensities (V, W); GA fades the outer bands, vessels shadow what lies below.
    s = an.intensity_scale
    layer_int = [np.full((n_v, width), inten * s[k]) for k, (_, _, inten, _) in enumerate(_LAYERS)]
    for k, (name, _, _, _) in enumerate(_LAYERS):
        if name in ("interdigitation", "ellipsoid"):
            layer_int[k] = layer_int[k] * (1.0 - loss)
    rpe_int = _RPE_INTENSITY * s[len(_LAYERS)] * (1.0 - loss)
    choroid_gain = (1.0 + params.hypertransmission * loss) * (1.0 + patch)
    drusen_shadow = 1.0 - 0.3 * np.clip(elevation / 0.04, 0.0, 1.0)
    attenuation = an.choroid_attenuation * (1.0 + 0.8 * loss) * height

    # Coarse choroidal texture (vessel lumens), drawn at a fixed resolution so all sizes look alike.
    coarse = rng.standard_normal((n_v, 24, 48))
    coarse = ndimage.gaussian_filter(coarse, sigma=(0.6, 1.2, 1.5), mode="wrap")
    coarse /= coarse.std() + 1e-12
    zoom = (height / coarse.shape[1], width / coarse.shape[2])

    looks = profile.speckle_looks / params.noise**2
    sigma = (profile.blur[0] * scale_h, profile.blur[1] * scale_w)
    noise_sigma = profile.noise_sigma * params.noise
    cue_rows, cue_cols = cue_box(height, width)
    glyphs = params.cue_intensity * _cue_glyphs(cue_rows, cue_cols)

    # One B-scan at a time keeps memory at a few B-scans even at the real size (100 x 512 x 1000).
    image = np.empty((n_v, height, width), dtype=np.float32)
    y = (np.arange(height, dtype=np.float32) + 0.5)[:, None]
    for b in range(n_v):
        inten = np.full((height, width), _VITREOUS, dtype=np.float32)
        prev = np.full(width, _VITREOUS)
        # Walk down from the vitreous: NFL first, interdigitation zone last, then the RPE band.
        for k in range(len(_LAYERS) - 1, -1, -1):
            inten += ((layer_int[k][b] - prev).astype(np.float32)) * _ramp(y - boundaries[k][b].astype(np.float32))
            prev = layer_int[k][b]
        inten += (rpe_int[b] - prev).astype(np.float32) * _ramp(y - rpe_top[b].astype(np.float32))
        inten += (_DRUSEN_MATERIAL - rpe_int[b]).astype(np.float32) * _ramp(y - rpe_bottom[b].astype(np.float32))
        texture = np.clip(1.0 + 0.3 * ndimage.zoom(coarse[b], zoom, order=1), 0.3, None).astype(np.float32)
        bruch_b = bruch[b].astype(np.float32)
        bottom_b = choroid_bottom[b].astype(np.float32)
        depth_below = np.clip(y - bruch_b, 0.0, None)
        choroid = (_CHOROID * s[-1]) * texture * np.exp(-depth_below / attenuation[b].astype(np.float32))
        sclera = _SCLERA * np.exp(-np.clip(y - bottom_b, 0.0, None) / np.float32(0.25 * height))
        at_sclera = _ramp(y - bottom_b)
        below = choroid * (1.0 - at_sclera) + sclera * at_sclera
        below *= (choroid_gain[b] * drusen_shadow[b]).astype(np.float32)
        at_choroid = _ramp(y - bruch_b)
        inten = inten * (1.0 - at_choroid) + below * at_choroid
        # Vessels sit at the ganglion cell level and shade everything beneath them.
        inten *= 1.0 - shadow[b].astype(np.float32) * _ramp(y - boundaries[-2][b].astype(np.float32))

        # Acquisition: speckle, blur, gain, gamma, burned-in cue, additive noise.
        inten *= rng.gamma(looks, 1.0 / looks, size=inten.shape).astype(np.float32)
        inten = ndimage.gaussian_filter(inten, sigma=sigma, mode="nearest")
        inten = np.clip(inten * np.float32(profile.gain), 0.0, 1.0) ** np.float32(profile.gamma)
        if spec.cue:
            inten[cue_rows, cue_cols] = np.maximum(inten[cue_rows, cue_cols], glyphs)
        inten += rng.normal(0.0, noise_sigma, size=inten.shape).astype(np.float32)
        image[b] = np.clip(inten, 0.0, 1.0)

    mask = np.zeros((n_v, height, width), dtype=np.uint8)
    inside = footprint >= 0.5
    if inside.any():
        yy = np.arange(height)[None, :, None] + 0.5
        mask = ((yy >= rpe_top[:, None, :]) & (yy <= choroid_bottom[:, None, :]) & inside[:, None, :]).astype(np.uint8)

    return RenderedVolume(image, mask, ilm, rpe_top, bruch, choroid_bottom, footprint)


def _cue_glyphs(rows: slice, cols: slice) -> np.ndarray:
    """A fixed text-like pattern (bright strokes with gaps) filling the watermark block."""
    h, w = rows.stop - rows.start, cols.stop - cols.start
    r = np.arange(h)[:, None]
    c = np.arange(w)[None, :]
    strokes = ((c % 4) != 3) & (((r + c // 4) % 3) != 2)
    strokes[0, :] = True  # a solid top rule keeps the block visible at any size
    return strokes.astype(np.float32)
