"""What the study runs: its parts, the method lists read from the registries, and the sizes of each profile.

The saliency methods and PPI masks come from their registries (:data:`ppi_med.saliency.METHODS`,
:data:`ppi_med.ppi.MASKS`) and the comparators from :data:`ppi_med.robust.COMPARATORS`, so a method added
there reaches ``make results`` without an edit here; where the study uses a subset, the filter is below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ppi_med.ppi import MASKS
from ppi_med.robust import COMPARATORS
from ppi_med.saliency import METHODS

__all__ = [
    "COMPARATOR_METHODS",
    "CONTROLS",
    "LIDC_ATTEMPTS",
    "LIDC_MASKS",
    "LIDC_SKIPPED_MASKS",
    "MAIN_SALIENCY",
    "OUTLINE_METHODS",
    "PARTS",
    "PROFILES",
    "SALIENCIES",
    "SELECTIONS",
    "SHORTCUT_ATTEMPTS",
    "Profile",
    "lidc_masks",
    "study_saliencies",
]

PARTS = ("ga", "sites", "lidc", "saliency", "shortcut", "cost")
#: PPI's own saliency: the GA table lists it after the other saliencies it is compared with
MAIN_SALIENCY = "wbp"
#: masks the LIDC part leaves out: ``topk`` removes a fixed number of voxels whatever the map holds, where the
#: part compares the masks that follow the map's shape (soft, adaptive soft, hard point, box)
LIDC_SKIPPED_MASKS = ("topk",)
CONTROLS = ("ppi_wbp_partner_zero", "random_mask", "random_erasing")
#: the model-selection rules of the comparison (``oracle`` only where a cue-decorrelated part exists)
SELECTIONS = ("train", "worst_site", "oracle")
#: the outline study's methods: the default (other-class fill), the zero fill, and the default at random places
OUTLINE_METHODS = ("baseline", "ppi", "ppi:fill=zero", "random_mask")
#: the other forms tried against the bar "no LIDC PPI setting more than 0.01 below the baseline" (docs/DESIGN.md
#: section 4.1): (name, PPI mask, bundle overrides); the box is the mask that misses it, the `own` guide the form
#: that holds the box, tried on the other masks too
_OWN = ("--ppi#guide", "own", "--ppi#contrast_classes", "[1]")  # no partner: x* of the sample's own map
LIDC_ATTEMPTS = (
    ("box_std_0.8", "box", ("--ppi#box_std", "0.8")),  # the box's half-size in std of the kept points (text: 1.2)
    ("box_std_1.6", "box", ("--ppi#box_std", "1.6")),
    ("box_guide_own", "box", _OWN),
    ("box_no_adversarial", "box", ("--ppi#adversarial_classes", "[]", "--ppi#contrast_classes", "[1]")),
    ("soft_guide_own", "soft", _OWN),
    ("hard_guide_own", "hard", _OWN),
    ("soft_adaptive_guide_own", "soft_adaptive", _OWN),
)
#: the settings tried against the digits' bar on the line cue (docs/DESIGN.md section 4.7), each a change to the
#: default that makes PPI remove the line sooner or more of it
SHORTCUT_ATTEMPTS = (
    "baseline", "ppi", "ppi:warmup_epochs=0", "ppi:absolute=true", "ppi:dilate=2", "ppi:sigma=0.1",
    "ppi:mask=soft_adaptive", "ppi:w_ad=3", "ppi:w_con=3", "ppi:mask=topk,topk=60",
)  # fmt: skip


def study_saliencies(methods: Sequence[str] = METHODS) -> tuple[str, ...]:
    """Every registered saliency method, in registry order with :data:`MAIN_SALIENCY` moved last.

    Args:
        methods: the saliency registry's names.

    Returns:
        The PPI saliencies of the GA table.
    """
    return tuple(sorted(methods, key=lambda m: m == MAIN_SALIENCY))  # stable: the others keep their order


def lidc_masks(masks: Sequence[str] = MASKS) -> tuple[str, ...]:
    """Every registered PPI mask but those in :data:`LIDC_SKIPPED_MASKS`, in registry order.

    Args:
        masks: the mask registry's names.

    Returns:
        The PPI-WBP masks of the LIDC table.
    """
    return tuple(m for m in masks if m not in LIDC_SKIPPED_MASKS)


SALIENCIES = study_saliencies()
LIDC_MASKS = lidc_masks()
#: the established fixes beside PPI (docs/DESIGN.md section 9): every registered comparator but plain training
#: (ERM, the baseline's), and DFR on the PPI-WBP model
COMPARATOR_METHODS = (*(c for c in COMPARATORS if c != "erm"), "ppi_wbp+dfr")


@dataclass(frozen=True)
class Profile:
    """Sizes of a study.

    Attributes:
        seeds: GA and site-CV seeds.
        ga: overrides of the GA bundle (on top of the held-out split).
        sites: extra arguments of ``pipelines.site_cv``.
        confounded: extra arguments of the confounded study (trained on the watermarked site only, scored on
            every site, one of them generated with the watermark's correlation reversed).
        confounded_seeds: its seeds (more than the other parts: one site's 20 training eyes make models that
            differ much from seed to seed in how far they lean on the watermark).
        lidc: overrides of the LIDC bundle.
        lidc_folds: patient-level folds of the LIDC datalist, each held out once.
        lidc_data: ``default`` (the bundle's phantom) or ``small`` (three thinned phantom patients).
        shortcut: arguments of ``pipelines.shortcut``.
        outline_shares: the shares of outlined training digits of the outline study (one shortcut job each).
        outlines: the outline study's other arguments.
        bench: arguments of the benchmark script.
        eval_ks: deletion sizes of the saliency evaluation.
        saliencies: the PPI saliencies of the GA table (registered saliency methods).
        lidc_masks: the PPI-WBP masks of the LIDC table (registered PPI masks).
        ga_controls, site_controls: the other methods of the GA table and the site studies: the pairing of the
            earlier default (``ppi_wbp_partner_zero``) and the two controls (docs/DESIGN.md section 4.5).
        lidc_controls: the controls of the LIDC table (its bundle pairs as ``ppi_wbp_partner_zero`` does already).
        comparators: the comparators of the GA and LIDC tables and the site studies (docs/DESIGN.md section 9).
        ga_selections: the selection rules besides ``train`` that the GA table's comparators, PPI-WBP, its
            controls and the baseline are trained under again (no ``oracle``: the pooled data has no
            cue-decorrelated part to validate on).
        oracle_site: the confounded study's cue-reversed site, which ``oracle`` selection validates on.
        comparator_shortcut: arguments of the shortcut comparators' jobs (one per selection rule).
        lidc_attempts: (name, PPI mask, bundle overrides) of the forms tried against the LIDC bar, each run on
            every fold as the LIDC table's settings are.
        attempts: arguments of the shortcut jobs of the settings tried against the digits' bar, run once under
            ``train`` selection and once scoring the last epoch (what the rule gave up).

    Raises:
        ValueError: a saliency or mask that its registry does not have, an unknown ``lidc_data``, or a GA
            selection rule other than ``worst_site``.
    """

    seeds: int
    ga: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    confounded: tuple[str, ...] = ("--train-sites", "D", "--synthetic#reversed_cue_site", "C")
    confounded_seeds: int = 5
    lidc: tuple[str, ...] = ()
    lidc_folds: int = 5
    lidc_data: str = "default"
    shortcut: tuple[str, ...] = ("--cue", "patch,line", "--grid", "default", "--seeds", "5")
    outline_shares: tuple[float, ...] = (0.1, 0.3, 1.0)
    outlines: tuple[str, ...] = ("--cue", "patch,line", "--seeds", "5")
    bench: tuple[str, ...] = ()
    eval_ks: str = "[100,500,1000,5000,10000]"
    saliencies: tuple[str, ...] = SALIENCIES
    lidc_masks: tuple[str, ...] = LIDC_MASKS
    ga_controls: tuple[str, ...] = CONTROLS
    site_controls: tuple[str, ...] = CONTROLS
    lidc_controls: tuple[str, ...] = tuple(c for c in CONTROLS if c != "ppi_wbp_partner_zero")
    comparators: tuple[str, ...] = COMPARATOR_METHODS
    ga_selections: tuple[str, ...] = ("worst_site",)
    oracle_site: str = "C"
    comparator_shortcut: tuple[str, ...] = (
        "--cue", "patch,line,intensity,texture", "--grid", "comparators", "--seeds", "5",
    )  # fmt: skip
    lidc_attempts: tuple[tuple[str, str, tuple[str, ...]], ...] = LIDC_ATTEMPTS
    attempts: tuple[str, ...] = (
        "--cue", "line", "--outline-share", "1", "--seeds", "5", "--methods", *SHORTCUT_ATTEMPTS,
    )  # fmt: skip

    def __post_init__(self) -> None:
        unknown = [s for s in self.saliencies if s not in METHODS]
        if unknown:
            raise ValueError(f"profile saliencies {unknown} are not saliency methods; choose from {', '.join(METHODS)}")
        unknown = [m for m in self.lidc_masks if m not in MASKS]
        if unknown:
            raise ValueError(f"profile LIDC masks {unknown} are not PPI masks; choose from {', '.join(MASKS)}")
        if not set(self.ga_selections) <= {"worst_site"}:
            raise ValueError(f"profile ga_selections may hold only 'worst_site', got {self.ga_selections}")
        if self.lidc_data not in ("default", "small"):
            raise ValueError(f"profile lidc_data must be 'default' or 'small', got '{self.lidc_data}'")


_TINY_GA = (
    "--synthetic#sites", "['A','B','C','D']", "--synthetic#subjects_per_site", "8", "--synthetic#n_bscans", "4",
    "--synthetic#height", "32", "--synthetic#width", "48", "--spatial_size", "[4,32,48]",
    "--network_def#width", "4", "--batch_size", "4", "--max_epochs", "2", "--ppi#warmup_epochs", "1",
)  # fmt: skip

_TINY_SITES = (*_TINY_GA, "--sites", "A,B,D", "--synthetic#sites", "['A','B','D']", "--min-steps", "0")

PROFILES = {
    "full": Profile(seeds=5),
    "quick": Profile(
        seeds=1,
        ga=_TINY_GA,
        sites=_TINY_SITES,
        confounded=(*_TINY_SITES, "--train-sites", "D", "--synthetic#reversed_cue_site", "B"),
        confounded_seeds=1,
        lidc=("--max_epochs", "2", "--network_def#width", "4", "--batch_size", "4", "--ppi#warmup_epochs", "1"),
        lidc_folds=3,
        lidc_data="small",
        shortcut=("--cue", "patch", "--grid", "default", "--seeds", "1", "--epochs", "1"),
        outline_shares=(1.0,),
        outlines=("--cue", "patch", "--seeds", "1", "--epochs", "1"),
        bench=("--repeats", "1", "--warmup", "0", "--skip-saliency"),
        eval_ks="[10,100]",
        saliencies=(MAIN_SALIENCY,),
        lidc_masks=("soft",),
        ga_controls=(),
        site_controls=(),
        lidc_controls=(),
        comparators=("dfr",),
        ga_selections=(),
        oracle_site="B",
        comparator_shortcut=("--cue", "patch", "--methods", "baseline", "ppi", "dfr", "--seeds", "1", "--epochs", "1"),
        lidc_attempts=(LIDC_ATTEMPTS[0],),
        attempts=("--cue", "line", "--outline-share", "1", "--seeds", "1", "--epochs", "1", "--methods", "ppi"),
    ),
}
