"""Every weight format through the apps as users run them: ``scripts/eval.py weights=...`` and
``scripts/predict.py weights=...`` as subprocesses on the generated data (issue 14). Files are written in their
real layouts (random weights, real key names) with the synthetic dataset's 10 classes; foreign files carry no
class names, so predict labels with numbered names, or with ``classes=<COCO JSON>``."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_convert import hf_resnet26, tiny_model, to_detectron2
from test_weights import official_model, tensors, to_official

pytestmark = pytest.mark.e2e  # runs the apps / launchers in subprocesses

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 10  # proscale.data.synthetic: 6 things + 4 stuff
COMMON = ["num_threads=1", "trainer.enable_progress_bar=false", "callbacks.compute_stats=null"]
# What weights cannot tell (attention heads reshape, they do not resize): the source models use 4, the tiny preset 2.
HEADS = ["model.nheads=4", "model.encoder.n_heads=4"]


def write_detectron2(path: Path) -> None:
    weights = to_detectron2(tiny_model("resnet", num_classes=NUM_CLASSES))
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "test"}, protocol=2))


def write_official(path: Path) -> None:
    torch.save({"model": to_official(official_model(num_classes=NUM_CLASSES)), "iteration": 1}, path)


def write_state_dict(path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors(tiny_model("resnet", num_classes=NUM_CLASSES)).items()}, path)


def write_hf_folder(path: Path) -> None:
    import transformers  # noqa: F401  (a dev dependency: missing means a broken install)
    torch.manual_seed(0)
    hf_resnet26(num_labels=NUM_CLASSES).save_pretrained(path, safe_serialization=True)


FORMATS = {
    "detectron2": ("model_final.pkl", write_detectron2),
    "proscale_official": ("proscale_r50.pth", write_official),
    "state_dict": ("weights.safetensors", write_state_dict),
    "hf": ("hf_model", write_hf_folder),
}


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("weights_apps")


# ~30 s each (two app subprocesses): the two foreign model-zoo layouts run by default, the others with -m slow
DEFAULT_SUITE = ("detectron2", "proscale_official")


@pytest.mark.parametrize(
    "fmt", [f if f in DEFAULT_SUITE else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FORMATS)]
)
def test_eval_and_predict_take_every_format(fmt, data_root, tmp_path):
    name, write = FORMATS[fmt]
    weights = tmp_path / name
    write(weights)
    paths = [f"paths.data_dir={data_root / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"]
    done = run("eval.py", "experiment=tiny", f"weights={weights}", *HEADS, *COMMON, *paths, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"({fmt}" in done.stdout  # the format was found by content
    (results,) = (tmp_path / "logs" / "eval").rglob("results.json")
    results = json.loads(results.read_text())
    assert results["status"] == "ok" and results["best_checkpoint"] == str(weights)
    assert all(isinstance(results[key], float) for key in ("PQ", "AP", "mIoU"))  # scored (random weights: ~0)

    val = data_root / "data" / "synthetic_tiny" / "val"
    gt_json = val.parent / "annotations" / "panoptic_val.json"
    out = tmp_path / "pred"
    args = [f"weights={weights}", f"input={val}", f"output_dir={out}", f"classes={gt_json}", "num_threads=1", *HEADS]
    done = run("predict.py", *args, f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    panoptic = json.loads((out / "panoptic.json").read_text())
    assert len(panoptic["annotations"]) == len(list(val.glob("*.jpg"))) > 0
    categories = [c["name"] for c in panoptic["categories"]]
    assert categories[:2] == ["circle", "square"] and len(categories) == NUM_CLASSES  # named by classes=
