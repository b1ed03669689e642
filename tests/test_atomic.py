"""The one atomic writer: whole files or none, refusals that name the path, no temporary files left."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppi_med.atomic import (
    atomic_open,
    atomic_path,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    stale_temporaries,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_each_helper_writes_a_whole_file_with_ordinary_permissions(tmp_path):
    out = tmp_path / "new" / "folder"
    atomic_write_bytes(out / "a.bin", b"\x00\x01")
    atomic_write_text(out / "a.txt", "grüße\n")
    atomic_write_json(out / "a.json", {"path": tmp_path}, indent=1, default=str)
    atomic_torch_save({"w": torch.arange(3)}, out / "a.pt")
    assert (out / "a.bin").read_bytes() == b"\x00\x01"
    assert (out / "a.txt").read_text(encoding="utf-8") == "grüße\n"
    text = (out / "a.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == {"path": str(tmp_path)}
    assert torch.equal(torch.load(out / "a.pt", weights_only=True)["w"], torch.arange(3))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "a.bin").stat().st_mode) == 0o666 & ~umask
    assert _leftovers(out) == []


def test_replace_or_refuse(tmp_path):
    target = tmp_path / "grades.csv"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    with pytest.raises(FileExistsError, match=r"refusing to overwrite existing output .*grades\.csv"):
        atomic_write_text(target, "newer", overwrite=False)
    assert target.read_text() == "new" and _leftovers(tmp_path) == []


def test_a_file_appearing_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "overlay.dcm"
    with pytest.raises(FileExistsError, match="overlay.dcm"):
        with atomic_path(target, overwrite=False) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"theirs")  # another writer got there first
    assert target.read_bytes() == b"theirs" and _leftovers(tmp_path) == []


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "datalist.json"
    atomic_write_json(target, {"training": []})
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_open(target, "w") as fh:
            fh.write('{"training": [')
            raise RuntimeError("killed mid-write")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert json.loads(target.read_text()) == {"training": []} and _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="mode 'w' or 'wb'.*datalist.json"):
        with atomic_open(target, "a"):
            pass


def test_the_temporary_path_keeps_a_double_suffix(tmp_path):
    """nibabel compresses by the file name: the temporary name must end in .nii.gz too."""
    nib = pytest.importorskip("nibabel")
    target = tmp_path / "image.nii.gz"
    with atomic_path(target, overwrite=False) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4)), tmp)
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert np.array_equal(np.asarray(nib.load(target).dataobj), np.ones((2, 2, 2)))


def test_the_checkpoint_saver_writes_through_the_one_writer(tmp_path, monkeypatch):
    """The bundles' AtomicCheckpointSaver: every file through atomic_torch_save, the older epoch removed only
    after the newer one is on disk."""
    from ignite.engine import Engine

    import ppi_med.resume as resume

    written = []

    def spy(obj, path, **kw):
        # the previous epoch's file is still there while the next one is written
        written.append((Path(path).name, sorted(p.name for p in Path(path).parent.glob("*.pt"))))
        return atomic_torch_save(obj, path, **kw)

    monkeypatch.setattr(resume, "atomic_torch_save", spy)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    saver = resume.AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": net, "optimizer": opt}, save_interval=1, n_saved=1, save_final=True
    )
    saver.attach(engine)
    engine.run([0], max_epochs=3)
    assert [w[0] for w in written] == [
        "checkpoint_epoch=1.pt",
        "checkpoint_epoch=2.pt",
        "checkpoint_epoch=3.pt",
        "checkpoint_final_iteration=3.pt",
    ]
    assert written[1][1] == ["checkpoint_epoch=1.pt"] and written[2][1] == ["checkpoint_epoch=2.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt", "checkpoint_final_iteration=3.pt"]
    state = torch.load(tmp_path / "checkpoint_epoch=3.pt", weights_only=True)
    assert torch.equal(state["model"]["weight"], net.weight) and "optimizer" in state


@pytest.mark.slow
def test_a_killed_write_leaves_the_target_and_a_temporary_that_is_found(tmp_path):
    target = tmp_path / "checkpoint_epoch=3.pt"
    target.write_bytes(b"whole")
    code = (
        "import os, sys\n"
        "from ppi_med.atomic import atomic_open\n"
        "with atomic_open(sys.argv[1], 'wb') as fh:\n"
        "    fh.write(b'half'); fh.flush(); os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], timeout=120)
    assert proc.returncode == 9 and target.read_bytes() == b"whole"
    (left,) = stale_temporaries(tmp_path)
    assert left.name.startswith(".checkpoint_epoch=3.pt.") and left.name.endswith(".tmp.pt")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert stale_temporaries(tmp_path) == [left] and stale_temporaries(tmp_path / "missing") == []
