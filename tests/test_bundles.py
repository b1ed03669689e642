"""The bundles as MONAI reads them: a folder each, its own metadata, one shared skeleton, and every documented
``monai.bundle run`` command naming ids the bundle has."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest
from bundle_files import GA_BUNDLE, LIDC_BUNDLE, MULTI_GPU, ROOT, SALIENCY

from pipelines.bundle_config import include_root, open_config, open_workflow

BUNDLES = ROOT / "bundles"
#: config file as a user names it -> the metadata name MONAI must load for it by default
ENTRIES = {
    GA_BUNDLE: "ppi-med GA classifier",
    BUNDLES / "ga_ppi" / "configs" / "train.json": "ppi-med GA classifier",
    LIDC_BUNDLE: "ppi-med LIDC nodule classifier",
}
#: the ids MONAI's workflow and its ``--tracking mlflow`` settings look for
MONAI_IDS = (
    "train#trainer",
    "train#handlers",
    "validate#evaluator",
    "validate#handlers",
    "initialize",
    "run",
    "finalize",
)


@pytest.mark.parametrize("config_file", list(ENTRIES), ids=lambda p: str(p.relative_to(ROOT)))
def test_monai_loads_each_bundles_own_metadata(config_file: Path) -> None:
    wf = open_workflow(config_file, workflow_type="train", logging_file=False)
    meta = wf.parser.get("_meta_")
    assert meta["name"] == ENTRIES[config_file]
    assert meta["version"] == json.loads((config_file.resolve().parent / "metadata.json").read_text())["version"]
    name = Path(wf.parser.get_parsed_content("common#bundle_name"))
    assert (BUNDLES / name / "configs" / "metadata.json").resolve() == (config_file.resolve().parent / "metadata.json")


@pytest.mark.parametrize("name", ["ga_ppi", "lidc_ppi"])
def test_each_bundle_is_a_model_zoo_folder_on_the_shared_skeleton(name: str) -> None:
    folder = BUNDLES / name
    for part in ("configs/train.json", "configs/metadata.json", "configs/logging.conf", "docs/README.md"):
        assert (folder / part).is_file(), f"{name} lacks {part}"
    raw = json.loads((folder / "configs" / "train.json").read_text())
    assert raw["common"] == "%bundles/common/base.json"
    # the skeleton is not restated: the bundle's trainer and evaluator are the shared ones
    assert raw["train"]["trainer"] == "@common#trainer" and raw["validate"]["evaluator"] == "@common#evaluator"
    parser = open_config(folder / "configs" / "train.json")
    for id_ in MONAI_IDS:
        assert id_ in parser, f"{name} lacks the MONAI id {id_}"
    assert isinstance(parser["train#handlers"], list) and isinstance(parser["validate#handlers"], list)


def test_the_tracking_option_of_monai_patches_the_shared_handlers(tmp_path: Path) -> None:
    """``--tracking mlflow`` appends its handler to ``train#handlers``/``validate#handlers`` beside the skeleton's."""
    wf = open_workflow(
        GA_BUNDLE,
        workflow_type="train",
        logging_file=False,
        tracking="mlflow",
        output_dir=str(tmp_path / "out"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    for section in ("train", "validate"):
        handlers = wf.parser[f"{section}#handlers"]
        assert handlers[0].replace("::", "#").startswith("@common#") and handlers[-1]["_target_"] == "MLFlowHandler"


def test_the_override_files_merge_without_reaching_into_the_skeleton() -> None:
    """Multi-GPU and saliency files set only top-level ids, so they merge with either bundle."""
    for extra in (MULTI_GPU, SALIENCY):
        raw = json.loads(extra.read_text())
        assert not [k for k in raw if "#" in k], f"{extra.name} reaches into nested ids"
        for bundle in (GA_BUNDLE, LIDC_BUNDLE):
            parser = open_config([bundle, extra])
            assert "initialize" in parser and "common#trainer" in parser
    parser = open_config([LIDC_BUNDLE, SALIENCY])
    assert parser.get_parsed_content("export_datalist") == parser.get_parsed_content("validate#datalist")


def test_includes_resolve_from_any_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert include_root(LIDC_BUNDLE, {"common": "%bundles/common/base.json"}) == ROOT
    parser = open_config(LIDC_BUNDLE)
    assert Path(parser["bundle_root"]) == BUNDLES / "lidc_ppi"
    with pytest.raises(FileNotFoundError, match="no folder above it holds"):
        include_root(tmp_path / "x.json", {"common": "%bundles/common/base.json"})


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``monai.bundle run`` command in the README and docs (code blocks and inline code), as (where, the
    words after ``run``); optional parts written ``[--id value]`` and a trailing ``...`` are left out."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(BUNDLES.rglob("*.md"))]:
        text = doc.read_text()
        commands = []  # (offset in text, command)
        for block in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S):
            offset = block.start(1)
            for line in re.split(r"(?<=\n)", block.group(1)):
                commands.append((offset, line))
                offset += len(line)
        prose = re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)
        commands += [(m.start(1), m.group(1)) for m in re.finditer(r"`([^`]+)`", prose)]
        joined: list[tuple[int, str]] = []
        for offset, command in commands:  # a fenced line ending in a backslash goes on in the next
            if joined and joined[-1][1].rstrip().endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1].rstrip()[:-1] + " " + command)
            else:
                joined.append((offset, command))
        for offset, command in joined:
            if "monai.bundle run" not in command:
                continue
            words = " ".join(command.split("monai.bundle run", 1)[1].split())
            words = re.sub(r"\s+#\s.*$", "", re.sub(r"\s*\[--[^\]]*\]|\s*\.\.\.", "", words))
            found.append((f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, offset) + 1}", shlex.split(words)))
    return found


COMMANDS = _documented_commands()


@pytest.mark.parametrize("argv", [c[1] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_documented_bundle_commands_name_ids_the_bundle_has(argv: list[str]) -> None:
    run_id, args = (argv[0], argv[1:]) if argv and not argv[0].startswith("--") else ("run", argv)
    assert all(a.startswith("--") for a in args[::2]) and len(args) % 2 == 0, f"not --id value pairs: {args}"
    pairs = {a[2:]: v for a, v in zip(args[::2], args[1::2])}
    files = pairs.pop("config_file")
    files = ast.literal_eval(files) if files.startswith("[") else [files]
    parser = open_config([ROOT / f for f in files])
    assert run_id in parser, f"no run id '{run_id}' in {files}"
    for key in pairs:
        if key in ("meta_file", "logging_file", "args_file", "tracking"):
            continue
        parent = key.rsplit("#", 1)[0] if "#" in key else key
        assert parent in parser, f"--{key}: {files} has no id '{parent}'"
        if "#" in key:
            assert isinstance(parser[parent], (dict, list)), f"--{key}: '{parent}' is not a dict or list"


def test_every_documented_command_was_found() -> None:
    """The extraction above sees the README's main command and the LIDC and export ones."""
    text = " ".join(" ".join(argv) for _, argv in COMMANDS)
    assert len(COMMANDS) >= 10
    for needle in ("bundles/ga_ppi.json", str(LIDC_BUNDLE.relative_to(ROOT)), "export", "evaluate_saliency"):
        assert needle in text, needle


def test_a_run_folder_name_keeps_only_safe_characters() -> None:
    """The LIDC default's label has a ``:`` (``ppi_wbp_partner_zero:mode=detached``); its run folder does not."""
    from ppi_med.tracking import unique_run_name

    parser = open_config(LIDC_BUNDLE)
    label = parser.get_parsed_content("common#method")
    assert ":" in label
    name = unique_run_name("lidc-" + label)
    assert re.fullmatch(r"lidc-[A-Za-z0-9_.+=,-]+-\d{8}-\d{6}-\d+", name), name
    assert unique_run_name("runs/x/ga-inference").startswith("runs/x/ga-inference-")
