"""proscale.utils.io: every writer lands the exact content atomically, leaves no temporary behind, keeps the old file
when the write fails half-way, and remove_stale_temporaries finds what killed writers leave (files and folders)."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from proscale.utils import io

matplotlib.use("Agg")


def no_temporaries(folder) -> bool:
    return not [p for p in folder.rglob("*") if io.TMP_MARKER in p.name]


def test_each_writer_writes_its_content(tmp_path):
    io.atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    io.atomic_write_text(tmp_path / "t.md", "| a |\n")
    io.atomic_write_json(tmp_path / "r.json", {"b": 1, "a": float("nan"), "t": torch.tensor([1, 2])})
    io.atomic_write_json(tmp_path / "c.json", [{"b": 1, "a": 2}], compact=True)
    ids = np.arange(12, dtype=np.uint8).reshape(3, 4)
    io.atomic_write_png(tmp_path / "m.png", ids)
    io.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "w.pt")
    io.atomic_save_safetensors(tmp_path / "w.safetensors", {"w": torch.arange(3.0)}, {"note": "x"})
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(1, 1))
    io.atomic_save_figure(tmp_path / "f.png", figure)
    plt.close(figure)

    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.md").read_text() == "| a |\n"
    text = (tmp_path / "r.json").read_text()
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")  # sorted, indented, for people
    assert json.loads(text)["t"] == [1, 2]
    assert (tmp_path / "c.json").read_text() == '[{"b": 1, "a": 2}]'  # compact, keys in order, for machines
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), ids)
    assert torch.load(tmp_path / "w.pt", weights_only=True)["w"].tolist() == [1.0, 1.0]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), "pt") as handle:
        assert handle.get_tensor("w").tolist() == [0.0, 1.0, 2.0] and handle.metadata() == {"note": "x"}
    assert Image.open(tmp_path / "f.png").format == "PNG"
    assert no_temporaries(tmp_path)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = io.atomic_write_text(tmp_path / "results.json", "old")

    def half_then_fail(handle):
        handle.write(b"new, half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        io.atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert no_temporaries(tmp_path)


def test_remove_stale_temporaries_finds_files_and_folders(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    stale_file = io.temporary_sibling(tmp_path / "run" / "checkpoints" / "last.ckpt")
    stale_file.write_bytes(b"half")
    stale_dir = io.temporary_sibling(tmp_path / "run" / "synthetic")
    (stale_dir / "train").mkdir(parents=True)
    (stale_dir / "train" / "1.jpg").write_bytes(b"x")
    keep = tmp_path / "run" / "checkpoints" / "last.ckpt"
    keep.write_bytes(b"whole")

    removed = io.remove_stale_temporaries(tmp_path)

    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert keep.read_bytes() == b"whole" and no_temporaries(tmp_path)
    assert io.remove_stale_temporaries(tmp_path / "missing") == []


def test_temporary_names_are_unique_per_writer(tmp_path):
    first, second = io.temporary_sibling(tmp_path / "x.json"), io.temporary_sibling(tmp_path / "x.json")
    assert first != second and first.parent == tmp_path and first.name.startswith(".x.json" + io.TMP_MARKER)
