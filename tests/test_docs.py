"""The README as a first page and the documentation site: every link resolves, ``mkdocs build --strict`` passes,
no page publishes a path of the machine that built it, and what the README says of the defaults is the bundle's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.portable import REPO, portable_path, portable_text

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
#: absolute paths of a build machine: temporary folders, checkouts, home folders, file URLs
MACHINE_PATH = re.compile(r"(?<![\w.])(/tmp/|/work/|/root/|/home/|file:///)")
# a Markdown link or image target, without its title
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _local_targets(md: Path) -> list[tuple[int, str]]:
    """(line, target) of every link in ``md`` that is not a URL or an anchor on the same page."""
    found = []
    for n, line in enumerate(md.read_text().splitlines(), 1):
        for target in LINK.findall(line):
            if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
                found.append((n, target.split("#")[0]))
    return found


def _nav_pages(nav: list) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _mkdocs_config() -> dict:
    # mkdocs.yml holds no Python tags, so the plain loader reads it
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_readme_is_a_first_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines, at most 200"
    # .ci/run runs `make test`; the set-up commands and the fast loop are the ones the Makefile and pytest know
    for command in ("make run", "make test", '.venv/bin/python -m pytest -m "not slow" -q'):
        assert command in text, f"README.md lacks `{command}`"
    # a figure typed by hand goes stale at the next study: only the generated results block may hold figures
    begin, end = text.index("<!-- results:begin -->"), text.index("<!-- results:end -->")
    text = text[:begin] + text[end:]
    lines = enumerate(text.splitlines(), 1)
    figures = [(n, m.group(0)) for n, line in lines for m in re.finditer(r"\b0\.\d{3}\b", line)]
    assert not figures, f"README.md types result figures by hand (line, figure): {figures}"


def test_every_link_of_the_readme_resolves_and_its_pages_are_on_the_site() -> None:
    nav = set(_nav_pages(_mkdocs_config()["nav"]))
    targets = _local_targets(README)
    assert targets, "README.md links to nothing"
    for n, target in targets:
        path = (ROOT / target).resolve()
        assert path.exists(), f"README.md:{n} links to {target}, which does not exist"
        if path.suffix == ".md" and DOCS in path.parents:
            page = path.relative_to(DOCS).as_posix()
            assert page in nav, f"README.md:{n} links to {target}, which is not in mkdocs.yml's nav"


def test_every_nav_entry_is_a_page() -> None:
    for page in _nav_pages(_mkdocs_config()["nav"]):
        assert (DOCS / page).is_file(), f"mkdocs.yml's nav names {page}, which is not in docs/"


def test_no_two_pages_share_a_url_or_a_name_up_to_case() -> None:
    """``x.md`` and ``x/README.md`` both become ``x/``; ``RESULTS.md`` and ``results.md`` clash on macOS."""
    seen: dict[str, Path] = {}
    for md in sorted(DOCS.rglob("*.md")):
        rel = md.relative_to(DOCS)
        url = (rel.parent if rel.stem in ("README", "index") else rel.with_suffix("")).as_posix().lower()
        assert url not in seen, f"{rel} and {seen[url].relative_to(DOCS)} are both the page {url}/"
        seen[url] = md


def _published_files() -> list[Path]:
    files = [README, ROOT / "mkdocs.yml"]
    for f in sorted(DOCS.rglob("*")):
        if f.is_file() and f.suffix in (".md", ".csv", ".json", ".txt", ".yml", ".yaml", ".html"):
            files.append(f)
    return files


def test_no_page_publishes_a_path_of_the_build_machine() -> None:
    hits = []
    for f in _published_files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if m := MACHINE_PATH.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line[max(0, m.start() - 40) : m.end() + 40]!r}")
    assert not hits, "absolute paths of a build machine:\n" + "\n".join(hits)


def test_the_readme_states_the_ga_bundles_ppi_defaults() -> None:
    """The defaults the README names are the ones ``bundles/ga_ppi/configs/train.json`` sets."""
    ppi = json.loads((ROOT / "bundles" / "ga_ppi" / "configs" / "train.json").read_text())["ppi"]
    text = " ".join(README.read_text().split())
    stated = {
        "guide": ("study", "`ppi#guide study`"),
        "fill": ("other_class", "`fill other_class`"),
        "contrast_classes": ([1], "`contrast_classes [1]`"),
        "adversarial_classes": ([1], "`adversarial_classes [1]`"),
        "saliency": ("wbp", "PPI with WBP"),
        "warmup_epochs": ("$@max_epochs // 2", "plain cross-entropy for half the epochs"),
        "ramp_epochs": ("$@max_epochs // 6", "ramped up over `max_epochs // 6` epochs"),
    }
    for key, (value, words) in stated.items():
        assert ppi[key] == value, f"train.json's ppi#{key} is {ppi[key]!r}; README.md says {words}: update it"
        assert words in text, f"README.md no longer states ppi#{key} as {words!r}"
    config = json.loads((ROOT / "bundles" / "ga_ppi" / "configs" / "train.json").read_text())
    assert config["weight_average"] == 2 and "`weight_average 2`" in text
    assert config["annotation_share"] == 1.0 and "`annotation_share 1.0`" in text
    # the partner form's settings stay in the bundle and act only with that guide (tests/test_ppi_guides.py)
    assert "`partner` and `exclusive` settings belong to the earlier partner form and act only with" in text


@pytest.mark.slow
def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """A broken link, a missing page or a missing include fails ``mkdocs build --strict``."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    # the testing page includes tests/README.md itself
    assert "Fast inner loop" in (tmp_path / "site" / "testing" / "index.html").read_text()


def test_portable_paths_are_relative_to_the_repository_or_the_output_folder(tmp_path: Path) -> None:
    assert portable_path(REPO / "runs" / "results" / "mlflow.db") == "runs/results/mlflow.db"
    assert portable_path("runs/x") == "runs/x"
    out = tmp_path / "study"
    assert portable_path(out, out) == "<out>"
    assert portable_path(tmp_path / "study.db", out) == "<out>/../study.db"
    assert portable_path("/elsewhere/deep/conf", out) == ".../conf"
    command = f"--out {out} --tracking-uri sqlite:///{tmp_path}/study.db --publish docs/shortcut"
    expected = "--out <out> --tracking-uri sqlite:///<out>/../study.db --publish docs/shortcut"
    assert portable_text(command, out) == expected
    overrides = json.dumps({"dataset_dir": str(REPO / "data" / "ga"), "uri": "http://host:5000/x"})
    assert portable_text(overrides) == '{"dataset_dir": "data/ga", "uri": "http://host:5000/x"}'
    assert portable_text(f"sqlite:///{REPO}/mlflow.db") == "sqlite:///mlflow.db"


def test_the_readmes_results_block_is_what_its_source_files_say(tmp_path: Path) -> None:
    """The README's figures are generated: the block between the markers equals the block rendered now."""
    from pipelines.readme_results import BEGIN, END, render_block, update_readme

    text = README.read_text()
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n")
    assert block == render_block(), "README.md's results block is stale: run python -m pipelines.readme_results"
    copy = tmp_path / "README.md"
    copy.write_text(text.replace(block, "- 0.999 typed by hand"))
    assert update_readme(copy, render_block()) and copy.read_text() == text
    copy.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        update_readme(copy, render_block())


def test_the_site_matrices_line_joins_the_block_once_its_table_is_published(tmp_path: Path) -> None:
    import shutil

    import pandas as pd

    from pipelines.readme_results import OPTIONAL, SOURCES, render_block

    for path in SOURCES.values():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, tmp_path / path)
    without = render_block(tmp_path)
    assert "Site matrices" not in without
    table = pd.DataFrame(
        {
            "method": ["baseline", "ppi_wbp", "dfr"],
            "seeds": [5, 5, 5],
            "out_mean": [0.70, 0.72, 0.78],
            "out_diff_baseline": [float("nan"), 0.021, 0.083],
            "out_p_baseline": [float("nan"), 0.41, 0.0004],
        }
    )
    (tmp_path / OPTIONAL["matrices"]).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(tmp_path / OPTIONAL["matrices"], index=False)
    lines = render_block(tmp_path).splitlines()
    assert lines[0] == without.splitlines()[0] and lines[2:] == without.splitlines()[1:]
    assert lines[1].startswith("- Site matrices, each of the four sites trained on in turn, 5 seeds: pooled AUC")
    assert "0.720 with PPI against 0.700 (on the seed-averaged scores +0.021, DeLong p = 0.410)" in lines[1]
    assert "Best of the 3 methods: `dfr` (0.780, +0.083 over the baseline, DeLong p < 0.001)" in lines[1]
