"""Where the project's bundles are, and a working folder to run them from."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GA_BUNDLE = ROOT / "bundles" / "ga_ppi.json"
LIDC_BUNDLE = ROOT / "bundles" / "lidc_ppi" / "configs" / "train.json"
GA_INFERENCE = ROOT / "bundles" / "ga_ppi" / "configs" / "inference.json"
SALIENCY = ROOT / "bundles" / "common" / "saliency.json"
MULTI_GPU = ROOT / "bundles" / "common" / "multi_gpu.json"


def workdir(folder: Path) -> Path:
    """``folder`` as a bundle's working folder: the bundles include their shared skeleton by a path relative to
    the working folder (``bundles/common/base.json``), so the project's ``bundles`` is linked in."""
    link = folder / "bundles"
    if not link.exists():
        link.symlink_to(ROOT / "bundles", target_is_directory=True)
    return folder


def config_list(*files: Path) -> str:
    """MONAI's command-line form of several config files merged in order."""
    return "[" + ",".join(f"'{f}'" for f in files) + "]"
