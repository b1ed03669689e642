"""Where the study finds the repository, its bundles and the committed GPU figures.

Every bundle file the study runs or reads is named here and nowhere else, so moving a bundle is a one-line
change (the job commands, the shared data and the report's prose all read :data:`BUNDLES`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLES", "GPU_FIGURES", "ROOT"]

#: the repository root: every job runs with it as working directory
ROOT = Path(__file__).resolve().parents[2]
#: the bundle config of each data set, and the saliency runs' config that is layered on one, relative to :data:`ROOT`
BUNDLES = {
    "ga": "bundles/ga_ppi.json",
    "lidc": "bundles/lidc_ppi/configs/train.json",
    "saliency": "bundles/common/saliency.json",
}
#: GPU measurements made once by the benchmark scripts on a GPU machine (``make results`` runs on CPU)
GPU_FIGURES = ROOT / "docs" / "gpu"
