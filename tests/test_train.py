"""Training framework tests: fast_dev_run per encoder, optimizer/schedules, NaN handling, results.json, checkpoint
compatibility, evaluation and prediction from a checkpoint. All runs use the `tiny` preset (64 px, d=32)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from proscale.lightning.ema import ModelEMA
from proscale.lightning.module import NonFiniteLossError
from proscale.lightning.optim import PAPER_MILESTONES, WarmupSchedule, build_adamw, param_groups
from proscale.models.criterion import SetCriterion
from proscale.models.encoders import ENCODERS
from proscale.tasks.eval import evaluate
from proscale.tasks.predict import predict
from proscale.tasks.train import train
from proscale.utils.hydra_utils import compose_config
from proscale.utils.io import atomic_torch_save, atomic_write_json
from proscale.utils.results import read_results
from proscale.utils.safe_load import torch_load

TINY = ["experiment=tiny", "num_threads=1", "trainer.enable_progress_bar=false"]


def tiny_cfg(log_dir: Path, data_dir: Path, output_dir: Path, *overrides: str, config: str = "train"):
    base = (
        TINY if config == "train" else [o for o in TINY if "progress" not in o] + ["trainer.enable_progress_bar=false"]
    )
    return compose_config(
        config, [*base, f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}", *overrides], output_dir=output_dir
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


# ----------------------------------------------------------------------------------------------- optimizer
def test_param_groups_follow_the_recipe():
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.head = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(3, 4))
    model.level_embed = nn.Parameter(torch.zeros(3, 4))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.frozen = frozen
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, weight_decay=0.05, backbone_lr_multiplier=0.1)}
    by_param = {id(p): g for g in groups.values() for p in g["params"]}
    assert by_param[id(model.backbone[0].weight)]["lr"] == pytest.approx(1e-5)
    assert by_param[id(model.backbone[0].weight)]["weight_decay"] == 0.05
    assert by_param[id(model.backbone[1].weight)]["weight_decay"] == 0.0
    assert by_param[id(model.backbone[1].weight)]["lr"] == pytest.approx(1e-5)
    assert (
        by_param[id(model.head[0].weight)]["lr"] == 1e-4 and by_param[id(model.head[0].weight)]["weight_decay"] == 0.05
    )
    for no_decay in (model.head[1].weight, model.head[1].bias, model.head[2].weight, model.level_embed):
        assert by_param[id(no_decay)]["weight_decay"] == 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable) == len(by_param)
    optimizer = build_adamw(model)
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["lr"] == 1e-4
    with pytest.raises(ValueError, match="lr must be > 0"):
        build_adamw(model, lr=-1.0)
    # fused (one kernel) by default on CPU, and the same update as the per-parameter loop
    assert optimizer.defaults["fused"] is True and build_adamw(model, fused=False).defaults["fused"] is None
    twins = [nn.Linear(4, 3), nn.Linear(4, 3)]
    twins[1].load_state_dict(twins[0].state_dict())
    for twin, fused in zip(twins, (True, False)):
        opt = build_adamw(twin, lr=1e-2, fused=fused)
        for step in range(3):
            twin.weight.grad = torch.full_like(twin.weight, 0.1 * (step + 1))
            twin.bias.grad = torch.full_like(twin.bias, -0.2)
            opt.step()
    torch.testing.assert_close(twins[0].weight, twins[1].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(twins[0].bias, twins[1].bias, atol=1e-6, rtol=0)


def test_schedules_warmup_multistep_poly():
    multistep = WarmupSchedule(1000, "multistep", milestones=(0.5, 0.75), warmup_steps=10, warmup_factor=0.1)
    assert [multistep(s) for s in (0, 5, 10, 499)] == pytest.approx([0.1, 0.55, 1.0, 1.0])
    assert multistep(500) == pytest.approx(0.1) and multistep(750) == pytest.approx(0.01)
    poly = WarmupSchedule(100, "poly", power=0.9)
    assert poly(50) == pytest.approx(0.5**0.9) and poly(100) == 0.0
    assert WarmupSchedule(368_750, milestones=PAPER_MILESTONES).milestones == [327_778, 355_092]
    assert WarmupSchedule(100, milestones=(30, 60)).milestones == [30, 60]  # absolute steps work too


def test_ema_tracks_the_weights_and_swaps_in_and_out():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay ramps: min(0.5, 1/10) = 0.1 -> 0.9 * 1.0
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9))
    raw = ema.swap_in(model)
    assert torch.allclose(model.weight, torch.full((1, 2), 0.9))
    ema.swap_out(model, raw)
    assert torch.allclose(model.weight, torch.ones(1, 2))
    restored = ModelEMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])


# ----------------------------------------------------------------------------------------------- atomic files
def test_atomic_writes_never_leave_partial_files(tmp_path, monkeypatch):
    target = tmp_path / "model.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, target)

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target)["w"], torch.ones(3))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]  # no temporary left behind
    atomic_write_json(tmp_path / "results.json", {"PQ": 1.5})
    assert json.loads((tmp_path / "results.json").read_text()) == {"PQ": 1.5}


# ----------------------------------------------------------------------------------------------- training runs
@pytest.mark.parametrize("encoder", ENCODERS.names())
def test_fast_dev_run_each_encoder(encoder, tmp_path, data_dir):
    cfg = tiny_cfg(
        tmp_path / "logs", data_dir, tmp_path / "run", f"model/encoder={encoder}", "trainer.fast_dev_run=true"
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    assert 0.0 <= metrics["test/PQ"] <= 100.0 and 0.0 <= metrics["test/mIoU"] <= 100.0
    results = read_results(tmp_path / "run")
    assert results["status"] == "ok" and results["tags"]["encoder"] == encoder
    assert results["PQ"] == pytest.approx(metrics["test/PQ"])
    assert results["params"] == sum(p.numel() for p in objects["module"].model.parameters())
    assert results["encoder_gflops"] > 0 and results["total_gflops"] > results["encoder_gflops"]


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tmp_path, data_dir, monkeypatch):
    real_total = SetCriterion.total_loss
    calls = {"n": 0}

    def first_two_nan(self, losses):
        calls["n"] += 1
        total = real_total(self, losses)
        return total * float("nan") if calls["n"] <= 2 else total

    monkeypatch.setattr(SetCriterion, "total_loss", first_two_nan)
    cfg = tiny_cfg(
        tmp_path / "logs", data_dir, tmp_path / "a", "steps=2", "test=false", "trainer.check_val_every_n_epoch=10"
    )
    _, objects = train(cfg)
    assert objects["module"].nonfinite_total == 2  # both skipped, counted ...
    assert objects["trainer"].global_step == 2  # ... and the two real steps still happened
    assert read_results(tmp_path / "a")["nonfinite_skipped"] == 2

    monkeypatch.setattr(SetCriterion, "total_loss", lambda self, losses: real_total(self, losses) * float("inf"))
    cfg = tiny_cfg(
        tmp_path / "logs", data_dir, tmp_path / "b", "steps=5", "module.max_consecutive_nonfinite=3", "test=false"
    )
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        train(cfg)
    failed = read_results(tmp_path / "b")
    assert failed["status"] == "failed" and "consecutive non-finite" in failed["error"]


def test_step_based_validation_scores_a_run_shorter_than_one_epoch(tmp_path, data_dir):
    """cpu_ablation's trainer settings: a run that ends inside its first epoch still validates at its last step,
    so the test scores the best (= final) checkpoint; epoch-based validation would never have run."""
    step_based = ["trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=${steps}"]
    results = {}
    for name, extra in (("epoch", []), ("step", step_based)):
        cfg = tiny_cfg(tmp_path / "logs", data_dir, tmp_path / name, "steps=3", "test=false", *extra)
        _, objects = train(cfg)  # tiny: 8 images / batch 2 = 4 batches per epoch
        assert objects["trainer"].global_step == 3
        results[name] = read_results(tmp_path / name)
    assert results["epoch"]["best_checkpoint"] is None
    best = Path(results["step"]["best_checkpoint"])
    assert best.is_file() and "step_000003" in best.name
    assert 0.0 <= results["step"]["PQ"] <= 100.0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    """One tiny training run (1 epoch = 4 steps, validation, best + last checkpoints, test)."""
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "logs" / "train" / "runs" / "tiny" / "run1"
    cfg = tiny_cfg(root / "logs", data_dir, run_dir, "steps=4")
    metrics, objects = train(cfg)
    return {"root": root, "run_dir": run_dir, "metrics": metrics, "results": read_results(run_dir)}


def test_results_json_and_checkpoints(trained_run):
    results = trained_run["results"]
    assert results["status"] == "ok" and results["split"] == "test" and results["experiment"] == "tiny"
    for key in ("PQ", "SQ", "RQ", "AP", "mIoU"):
        assert 0.0 <= results[key] <= 100.0
    for key in ("encoder_gflops", "total_gflops", "params", "ms_per_img", "wall_time_s"):
        assert results[key] > 0
    assert results["tags"] == {
        "encoder": "proscale",
        "schedule": "3-3-3",
        "backbone": "resnet10t",
        "lpe": True,
        "seed": 0,
    }
    checkpoints = trained_run["run_dir"] / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and Path(results["best_checkpoint"]).is_file()
    checkpoint = torch_load(results["best_checkpoint"])
    assert checkpoint["hyper_parameters"]["meta"]["class_names"]  # predict needs no dataset
    assert checkpoint["hyper_parameters"]["model_config"]["encoder"]["schedule"] == [3, 3, 3]


def test_checkpoint_of_another_architecture_lists_mismatching_keys(trained_run, data_dir, tmp_path):
    best = trained_run["results"]["best_checkpoint"]
    cfg = tiny_cfg(trained_run["root"] / "logs", data_dir, tmp_path / "m2f", "model/encoder=m2f", f"ckpt_path={best}")
    with pytest.raises(ValueError, match="does not fit the configured model") as error:
        train(cfg)
    assert "pixel_decoder.encoder.layers.6" in str(error.value) or "pixel_decoder.encoder." in str(error.value)
    assert "trc" in str(error.value)  # PRO-SCALE's TRC weights have no place in M2F


def test_evaluate_reproduces_the_test_metrics(trained_run, data_dir, tmp_path):
    cfg = tiny_cfg(
        trained_run["root"] / "logs",
        data_dir,
        tmp_path / "eval",
        f"ckpt_path={trained_run['results']['best_checkpoint']}",
        config="eval",
    )
    metrics, _ = evaluate(cfg)
    compared = {key: trained_run["metrics"][f"test/{key}"] for key in ("PQ", "AP", "mIoU")}
    assert max(compared.values()) > 0, f"the trained run scores 0 everywhere, nothing is compared: {compared}"
    for key in ("PQ", "AP", "mIoU"):
        assert metrics[f"test/{key}"] == pytest.approx(trained_run["metrics"][f"test/{key}"], abs=1e-6)
    results = read_results(tmp_path / "eval")
    assert results["task_name"] == "eval" and results["PQ"] == pytest.approx(trained_run["results"]["PQ"], abs=1e-6)


def test_ckpt_path_last_finds_the_latest_run(trained_run, data_dir, tmp_path):
    cfg = tiny_cfg(trained_run["root"] / "logs", data_dir, tmp_path / "eval_last", "ckpt_path=last", config="eval")
    _, objects = evaluate(cfg)
    assert objects["results"]["best_checkpoint"] == str(trained_run["run_dir"] / "checkpoints" / "last.ckpt")


def test_predict_writes_overlays_and_coco_json(trained_run, data_dir, tmp_path):
    images = sorted((data_dir / "synthetic_tiny" / "val").glob("*.jpg"))[:2]
    input_dir = tmp_path / "images"
    input_dir.mkdir()
    for index, path in enumerate(images):
        Image.open(path).resize((80, 60)).save(input_dir / f"img{index}.png")
    cfg = compose_config(
        "predict",
        [
            f"weights={trained_run['results']['best_checkpoint']}",
            f"input={input_dir}/img*.png",  # a glob
            f"output_dir={tmp_path / 'pred'}",
            "short_side=64",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        output_dir=tmp_path / "predict_run",
    )
    summary, _ = predict(cfg)
    assert summary["images"] == summary["succeeded"] == 2 and summary["failed"] == 0
    overlays = sorted((tmp_path / "pred" / "overlays").glob("*.png"))
    assert [p.name for p in overlays] == ["img0.png", "img1.png"]
    # the 60x80 input enlarged 6x (short side >= 320 for readable labels) plus the legend panel on the right
    overlay = np.asarray(Image.open(overlays[0]))
    assert overlay.shape[0] == 360 and overlay.shape[1] > 480 and overlay.shape[2] == 3
    coco = json.loads((tmp_path / "pred" / "panoptic.json").read_text())
    assert [a["file_name"] for a in coco["annotations"]] == ["img0.png", "img1.png"]
    assert [a["image_id"] for a in coco["annotations"]] == [1, 2]  # numbered from 1 without gt_json
    checkpoint = torch_load(trained_run["results"]["best_checkpoint"])
    class_names = checkpoint["hyper_parameters"]["meta"]["class_names"]
    assert [c["name"] for c in coco["categories"]] == class_names
    for annotation in coco["annotations"]:
        ids = np.asarray(Image.open(tmp_path / "pred" / "panoptic" / annotation["file_name"]), dtype=np.int64)
        ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
        assert ids.shape == (60, 80)
        assert {s["id"] for s in annotation["segments_info"]} <= set(np.unique(ids).tolist())
        semantic = np.asarray(Image.open(tmp_path / "pred" / "semantic" / annotation["file_name"]))
        assert semantic.shape == (60, 80) and semantic.max() < len(class_names)


def test_layer_summary_has_no_flops_column(capsys):
    """Lightning's summary prints FLOPs as 0 for modules without example_input_array; ours drops them."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.model_summary.model_summary import summarize

    from proscale.lightning.callbacks import LayerSummary

    class Tiny(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 4)
            self.head = nn.Sequential(nn.Linear(4, 2))

    summary = summarize(Tiny(), max_depth=2)
    assert any(name == "FLOPs" for name, _ in summary._get_summary_data())  # (what Lightning would print)
    LayerSummary.summarize(
        summary._get_summary_data(),
        summary.total_parameters,
        summary.trainable_parameters,
        summary.model_size,
        summary.total_training_modes,
        summary.total_flops,
    )
    out = capsys.readouterr().out
    assert "FLOPs" not in out and "head.0" in out
    assert "Params: 26 (26 trainable, 0 frozen)" in out


def test_progress_log_writes_plain_lines_only_without_a_terminal(monkeypatch):
    from types import SimpleNamespace

    from proscale.lightning import callbacks

    lines: list[str] = []
    monkeypatch.setattr(callbacks.log, "info", lines.append)
    trainer = SimpleNamespace(
        is_global_zero=True,
        estimated_stepping_batches=10,
        global_step=0,
        current_epoch=0,
        sanity_checking=False,
        callback_metrics={"val/PQ": torch.tensor(12.5), "val/AP": torch.tensor(3.0)},
    )

    def run(tty: bool) -> None:
        monkeypatch.setattr(callbacks.sys.stdout, "isatty", lambda: tty)
        progress = callbacks.ProgressLog(every_n_steps=5)
        trainer.global_step = 0
        progress.on_train_start(trainer, None)
        for step in (1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10):  # step 5 twice: accumulated batches share a step
            trainer.global_step = step
            progress.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.5)}, None, 0)
        progress.on_validation_end(trainer, None)

    run(tty=True)
    assert lines == []  # the rich bar shows it in a terminal
    run(tty=False)
    assert len(lines) == 3, lines
    assert lines[0].startswith("train: step 5/10 (50 %), epoch 0, loss 1.500, ") and "ETA" in lines[0]
    assert lines[1].startswith("train: step 10/10 (100 %)")
    assert lines[2] == "validation at step 10: val/PQ 12.50, val/AP 3.00"
    with pytest.raises(ValueError, match="every_n_steps"):
        callbacks.ProgressLog(every_n_steps=0)
