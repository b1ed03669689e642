"""Open a bundle config from any working folder.

A training bundle includes the shared skeleton with a MONAI macro (``"common": "%bundles/common/base.json"``),
and MONAI resolves a macro's file path against the working folder. The command line runs from the project
root, where that path holds; a study that trains cells in-process from its own output folder (site CV) or a
test in a temporary folder does not. These helpers find the folder the bundle's includes resolve from (the
nearest one above the config file) and resolve them there, once, so everything else reads the config as
MONAI does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["include_root", "includes", "open_config", "open_workflow", "resolve_includes"]


def includes(config: Any) -> set[str]:
    """The file paths of the ``%path#id`` macros anywhere in ``config`` (a parsed JSON value)."""
    found: set[str] = set()
    if isinstance(config, Mapping):
        for value in config.values():
            found |= includes(value)
    elif isinstance(config, list):
        for value in config:
            found |= includes(value)
    elif isinstance(config, str) and config.startswith("%"):
        path = config[1:].split("#", 1)[0]
        if path.lower().endswith((".json", ".yaml", ".yml")):  # else a macro of an id of the same config
            found.add(path)
    return found


def include_root(config_file: str | Path, config: Any) -> Path:
    """The nearest folder above ``config_file`` from which every include of ``config`` resolves.

    Both the path as given and its target are searched, so ``bundles/ga_ppi.json`` (a link into
    ``bundles/ga_ppi/configs``) finds the project root either way.

    Raises:
        FileNotFoundError: no folder above the config file holds the included files.
    """
    return _root_of(config_file, includes(config))


def _root_of(config_file: str | Path, paths: set[str]) -> Path:
    given = Path(config_file).absolute()
    for start in (given, given.resolve()):
        for folder in start.parents:
            if all((folder / p).is_file() for p in paths):
                return folder
    raise FileNotFoundError(
        f"{config_file} includes {sorted(paths)}, which no folder above it holds "
        "(run from the project root, or keep the bundle inside a project with its bundles/common folder)"
    )


@contextmanager
def _working_folder(folder: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def resolve_includes(parser: Any, config_file: str | Path) -> None:
    """Replace the macros of ``parser`` (a MONAI ``ConfigParser`` read from ``config_file``) by their content.

    Call it after the overrides are applied and before ``parse``; ids under an include (``common#network``)
    can be read, set and referenced afterwards like any other. A relative ``bundle_root`` (the files a run
    logs as artifacts) is anchored at the same folder, so it holds wherever the run writes.
    """
    paths = includes(parser.get())
    if not paths:
        return
    root = _root_of(config_file, paths)
    with _working_folder(root):
        parser.resolve_macro_and_relative_ids()
    bundle_root = parser.get("bundle_root")
    if isinstance(bundle_root, str) and not bundle_root.startswith(("$", "@")) and not Path(bundle_root).is_absolute():
        parser["bundle_root"] = str(root / bundle_root)


def open_config(config_file: str | Path | Sequence[str | Path], overrides: Mapping[str, Any] | None = None) -> Any:
    """A MONAI ``ConfigParser`` of ``config_file`` with ``overrides`` applied and its includes resolved.

    Args:
        config_file: a bundle config, or several merged in order as MONAI merges a list (a bundle, then
            ``bundles/common/saliency.json``); the includes resolve from above the first.
        overrides: ``id -> value`` pairs, as on the command line.
    """
    from monai.bundle import ConfigParser

    files = [config_file] if isinstance(config_file, (str, Path)) else list(config_file)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update(pairs=dict(overrides or {}))
    resolve_includes(parser, files[0])
    return parser


def open_workflow(config_file: str | Path, **kwargs: Any) -> Any:
    """``monai.bundle.ConfigWorkflow(config_file, **kwargs)`` with its includes resolved (see :func:`open_config`)."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(config_file), **kwargs)
    resolve_includes(workflow.parser, config_file)
    return workflow
