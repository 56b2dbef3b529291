"""Weights in the apps: ``scripts/train.py weights=...`` initialises the model (strict, partial on request), this
project's checkpoints load safely and give the EMA weights, and files that would run code are refused by every
entry (convert_weights.py, train ``weights=`` / ``ckpt_path=`` resume, eval, predict, read_weights) without
running their payload."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_convert import run_script

from proscale.lightning.callbacks import AtomicCheckpointIO
from proscale.tasks.eval import evaluate
from proscale.tasks.predict import predict
from proscale.tasks.train import train
from proscale.utils.hydra_utils import compose_config
from proscale.utils.safe_load import UnsafeFileError, torch_load
from proscale.weights import read_weights

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=tiny",
    "num_threads=1",
    "trainer.enable_progress_bar=false",
    "callbacks.compute_stats.timing_runs=0",
]


class _Payload:
    """Unpickling this calls ``os.system`` (touching a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cfg_for(root: Path, name: str, *overrides: str, config: str = "train"):
    return compose_config(
        config,
        [*TINY, f"paths.data_dir={root / 'data'}", f"paths.log_dir={root / 'logs'}", *overrides],
        output_dir=root / name,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny training run with EMA (2 steps, validation at the end): its best checkpoint."""
    root = tmp_path_factory.mktemp("weights_run")
    cfg = cfg_for(root, "run", "steps=2", "data.num_train=4", "module.ema_decay=0.5", "test=false",
                  "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=2")  # fmt: skip
    _, objects = train(cfg)
    return {"root": root, "ckpt": Path(objects["results"]["best_checkpoint"])}


def model_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def test_own_checkpoint_loads_safely_with_ema(run):
    checkpoint = torch_load(run["ckpt"])  # weights_only: the project's checkpoints need no unsafe unpickling
    assert checkpoint["hyper_parameters"]["ema_decay"] == 0.5
    loaded = read_weights(run["ckpt"])
    assert loaded.format == "lightning" and loaded.ema and loaded.meta["class_names"]
    assert loaded.model_config["encoder"]["schedule"] == [3, 3, 3]
    raw = model_weights(checkpoint)
    shadow = checkpoint["ema"]["shadow"]
    key = "transformer_decoder.query_feat.weight"
    assert not torch.equal(raw[key], shadow[key])  # a real difference to tell them apart
    assert torch.equal(loaded.state_dict[key], shadow[key])
    assert torch.equal(read_weights(run["ckpt"], use_ema=False).state_dict[key], raw[key])


def test_train_weights_initialises_the_model(run, tmp_path):
    """scripts/train.py weights=<plain safetensors> (a subprocess): strict load, report printed, and training
    starts from those weights (lr ~0, so the trained weights stay equal to them)."""
    source = read_weights(run["ckpt"]).state_dict
    save_file({"module." + k: v.contiguous() for k, v in source.items()}, tmp_path / "init.safetensors")
    run_dir = tmp_path / "run"
    command = [sys.executable, str(REPO / "scripts" / "train.py"), *TINY, "steps=2", "data.num_train=4", "test=false",
               "module.optimizer.lr=1e-12", f"paths.data_dir={run['root'] / 'data'}", f"paths.log_dir={tmp_path}",
               f"hydra.run.dir={run_dir}", f"weights={tmp_path / 'init.safetensors'}"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "init.safetensors (state_dict): " in done.stdout
    assert "0 missing; 0 unexpected; 0 reshaped" in done.stdout
    trained = model_weights(torch_load(run_dir / "checkpoints" / "last.ckpt"))
    for name in ("backbone.body.conv1.0.weight", "pixel_decoder.encoder.trc.linear.weight"):
        torch.testing.assert_close(trained[name], source[name], rtol=0, atol=1e-6)


def test_train_weights_with_another_class_count(run, tmp_path):
    loaded = read_weights(run["ckpt"])
    state = dict(loaded.state_dict)
    head = state["transformer_decoder.class_embed.weight"]
    state["transformer_decoder.class_embed.weight"] = torch.randn(head.shape[0] + 4, head.shape[1])
    state["transformer_decoder.class_embed.bias"] = torch.randn(head.shape[0] + 4)
    torch.save(state, tmp_path / "other_classes.pth")
    weights = f"weights={tmp_path / 'other_classes.pth'}"
    with pytest.raises(ValueError, match=r"other_classes\.pth have a class head for \d+ classes.*allow_partial=true"):
        train(cfg_for(run["root"], "strict", weights))
    assert not (run["root"] / "strict" / "checkpoints").exists()  # nothing written
    cfg = cfg_for(run["root"], "partial", weights, "weights_allow_partial=true", "train=false", "test=false")
    _, objects = train(cfg)
    model = objects["module"].model
    torch.testing.assert_close(model.pixel_decoder.mask_features.weight, state["pixel_decoder.mask_features.weight"])
    assert model.transformer_decoder.class_embed.weight.shape == head.shape  # the dataset's classes: a new head


def test_train_weights_conflicting_override_names_both_values(run, tmp_path):
    torch.save(read_weights(run["ckpt"]).state_dict, tmp_path / "plain.pth")
    cfg = cfg_for(run["root"], "conflict", f"weights={tmp_path / 'plain.pth'}", "model.encoder.schedule=[1,1,1]")
    with pytest.raises(ValueError, match=r"model\.encoder\.schedule=\[1,1,1\] .*plain\.pth.*schedule=\[3,3,3\]"):
        train(cfg)
    cfg = cfg_for(run["root"], "conflict_group", f"weights={tmp_path / 'plain.pth'}", "model/encoder=m2f")
    with pytest.raises(ValueError, match=r"model/encoder \(m2f\) .*plain\.pth.*model/encoder=proscale"):
        train(cfg)


@pytest.fixture(scope="module")
def evil_files(run, tmp_path_factory):
    """A .pth, a real Lightning .ckpt and a detectron2-style .pkl, each carrying an os.system payload."""
    folder = tmp_path_factory.mktemp("evil")
    marker = folder / "payload_ran"
    torch.save({"model": {"w": torch.ones(2)}, "x": _Payload(marker)}, folder / "evil.pth")
    checkpoint = torch_load(run["ckpt"])
    checkpoint["callbacks"]["evil"] = _Payload(marker)
    torch.save(checkpoint, folder / "evil.ckpt")
    (folder / "evil.pkl").write_bytes(pickle.dumps({"model": {"w": np.ones(2)}, "x": _Payload(marker)}, protocol=2))
    return {"folder": folder, "marker": marker}


@pytest.mark.parametrize("name", ["evil.pth", "evil.ckpt", "evil.pkl"])
def test_payloads_never_run(run, evil_files, name, capsys):
    path, marker = evil_files["folder"] / name, evil_files["marker"]
    root = run["root"]

    def refused(call, opt_in="allow_unsafe_load=true"):
        with pytest.raises(UnsafeFileError) as error:
            call()
        assert name in str(error.value) and opt_in in str(error.value)
        assert not marker.exists()

    refused(lambda: read_weights(path))
    refused(lambda: train(cfg_for(root, f"w_{name}", f"weights={path}")))
    refused(lambda: train(cfg_for(root, f"r_{name}", f"ckpt_path={path}")))  # resume
    refused(lambda: AtomicCheckpointIO().load_checkpoint(path))  # Lightning's own load on fit/test(ckpt_path)
    refused(lambda: evaluate(cfg_for(root, f"e_{name}", f"ckpt_path={path}", config="eval")))
    images = root / "images"
    images.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    predict_cfg = compose_config(
        "predict", [f"ckpt_path={path}", f"input={images}", f"paths.log_dir={root / 'logs'}"], output_dir=root / "p"
    )
    refused(lambda: predict(predict_cfg))
    out = evil_files["folder"] / f"{name}.safetensors"
    assert run_script("--src", str(path), "--out", str(out)) == 2
    error = capsys.readouterr().err
    assert name in error and "--unsafe" in error and not out.exists() and not marker.exists()
    for stage in ("w_", "r_", "e_"):
        assert not (root / f"{stage}{name}" / "checkpoints").exists()


def test_unsafe_opt_in_reads_a_trusted_file(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {"w": torch.ones(2)}, "x": _Payload(marker)}, tmp_path / "trusted.pth")
    with pytest.raises(ValueError, match="not a Mask2Former checkpoint"):  # read (payload ran), then judged
        read_weights(tmp_path / "trusted.pth", allow_unsafe=True)
    assert marker.exists()


def test_convert_weights_finds_the_format_by_content(run, tmp_path, capsys):
    """A plain dict is not "hf" and a Lightning checkpoint is not "detectron2": --format must match the content."""
    torch.save(read_weights(run["ckpt"]).state_dict, tmp_path / "plain.pth")
    for src, wrong in ((tmp_path / "plain.pth", "hf"), (run["ckpt"], "detectron2")):
        out = tmp_path / f"{src.stem}.safetensors"
        assert run_script("--src", str(src), "--format", wrong, "--out", str(out)) == 2
        assert f"--format {wrong} but {src}" in capsys.readouterr().err and not out.exists()
    out = tmp_path / "from_ckpt.safetensors"
    assert run_script("--src", str(run["ckpt"]), "--out", str(out)) == 0
    assert "EMA" in capsys.readouterr().out
    converted = read_weights(out)  # keeps the stored model config and class metadata in the header
    assert converted.model_config == read_weights(run["ckpt"]).model_config and converted.meta["class_names"]
    for key, value in read_weights(run["ckpt"]).state_dict.items():
        assert torch.equal(converted.state_dict[key], value)
