"""The safe loaders never run a payload from a file, and still read what weight files hold."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from proscale.utils.safe_load import UnsafeFileError, load_pickle, torch_load


class _Payload:
    """Unpickling this calls ``os.system`` (touching a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torch_file_with_a_payload_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": _Payload(marker)}, path)
    with pytest.raises(UnsafeFileError, match="evil.pth") as info:
        torch_load(path)
    assert "allow_unsafe_load=true" in str(info.value)
    assert not marker.exists()


def test_pickle_with_a_payload_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.ones(2)}, "x": _Payload(marker)}, protocol=2))
    with pytest.raises(UnsafeFileError, match="posix.system|os.system"):
        load_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_style_pickle_loads(tmp_path, protocol):
    weights = OrderedDict(
        [("stem.conv1.weight", np.random.rand(4, 3, 7, 7).astype(np.float32)), ("res2.0.x", np.arange(3))]
    )
    path = tmp_path / "R-50.pkl"
    path.write_bytes(
        pickle.dumps({"model": weights, "__author__": "torchvision", "matching_heuristics": True}, protocol)
    )
    loaded = load_pickle(path)
    assert loaded["__author__"] == "torchvision" and loaded["matching_heuristics"] is True
    np.testing.assert_array_equal(loaded["model"]["stem.conv1.weight"], weights["stem.conv1.weight"])
    np.testing.assert_array_equal(loaded["model"]["res2.0.x"], np.arange(3))


def test_plain_torch_checkpoint_loads(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"model": OrderedDict(w=torch.arange(3.0)), "epoch": 3, "name": "x"}, path)
    loaded = torch_load(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0)) and loaded["epoch"] == 3
