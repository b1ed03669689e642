"""Where a bundle finds its datalist: the user's data set, or the embedded default built on first use."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ga_datalist", "lidc_datalist"]


def _first_on_rank_zero(fn):
    """``fn()`` on rank 0 first, then on the other ranks of a distributed run (which find its output built)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    if dist.get_rank() == 0:
        out = fn()
        dist.barrier()
        return out
    dist.barrier()
    return fn()


def _resolve(dataset_dir: str | Path, default_dir: str | Path, build, how_to: str) -> str:
    dataset_dir, default_dir = Path(dataset_dir), Path(default_dir)
    if dataset_dir.resolve() == default_dir.resolve():
        return str(_first_on_rank_zero(lambda: build(dataset_dir)))  # idempotent: checks an existing default
    datalist = dataset_dir / "datalist.json"
    if datalist.is_file():
        return str(datalist)
    raise FileNotFoundError(f"no datalist.json in dataset_dir {dataset_dir}; {how_to}")


def ga_datalist(dataset_dir: str | Path, default_dir: str | Path, **synth: object) -> str:
    """The GA datalist in ``dataset_dir``; the synthetic multi-site OCT set is generated there if it is the default.

    Args:
        dataset_dir: the folder the bundle was given.
        default_dir: the bundle's default folder.
        **synth: generator options for the default (e.g. sizes), see ``data_prep.synth_oct.generate``.

    Raises:
        FileNotFoundError: a user-given folder without ``datalist.json``.
    """
    from . import synth_oct

    return _resolve(
        dataset_dir,
        default_dir,
        lambda root: synth_oct.ensure_default(root, **synth),
        "build one from your volumes with: python -m data_prep.oct --input DIR --out DIR",
    )


def lidc_datalist(dataset_dir: str | Path, default_dir: str | Path) -> str:
    """The LIDC patch datalist in ``dataset_dir``; the phantom download is built and preprocessed if default.

    Raises:
        FileNotFoundError: a user-given folder without ``datalist.json``.
    """
    from . import lidc

    return _resolve(
        dataset_dir,
        default_dir,
        lidc.ensure_default,
        "preprocess your TCIA download with: python -m data_prep.lidc --dicom-root ROOT --out DIR",
    )
