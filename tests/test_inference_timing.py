"""Round-robin inference timing (proscale/reporting/inference_timing.py) and the CPU-scale backbones of the
ablation's backbone axis (resnet18, swin_micro_patch4_window4)."""

from __future__ import annotations

import pytest
import torch

from proscale.reporting.inference_timing import round_robin_ms


def test_round_robin_warms_up_then_rotates_the_starting_configuration():
    calls_made = []
    clock_value = [0.0]

    def clock():
        return clock_value[0]

    def make(name, seconds):
        def run():
            calls_made.append(name)
            clock_value[0] += seconds

        return run

    calls = {"a": make("a", 0.001), "b": make("b", 0.002), "c": make("c", 0.004)}
    times = round_robin_ms(calls, warmup=1, repeats=3, clock=clock)
    assert calls_made == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"]
    assert times["a"] == pytest.approx([1.0, 1.0, 1.0]) and times["c"] == pytest.approx([4.0, 4.0, 4.0])
    with pytest.raises(ValueError, match="repeats >= 1"):
        round_robin_ms(calls, warmup=0, repeats=0)


def test_swin_micro_builds_through_timm_at_the_cpu_size_and_any_size():
    from proscale.models.backbones import build_backbone

    backbone = build_backbone("timm", model_name="swin_micro_patch4_window4").eval()
    assert backbone.out_channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
    with torch.no_grad():
        for height, width in ((128, 160), (96, 128)):
            out = backbone(torch.randn(1, 3, height, width))
            assert tuple(out["res2"].shape) == (1, 32, height // 4, width // 4)
            assert tuple(out["res5"].shape) == (1, 256, height // 32, width // 32)
            assert all(torch.isfinite(v).all() for v in out.values())
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_backbone("timm", model_name="swin_micro_patch4_window4", pretrained=True)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet18", "swin_micro_patch4_window4"])
def test_backbone_axis_trains_two_steps_at_128x160(tmp_path, backbone):
    """The overrides the ablation preset documents: the quick preset's model at 128x160 with another backbone."""
    from proscale.tasks.train import train
    from proscale.utils.hydra_utils import compose_config

    cfg = compose_config(
        "train",
        [
            "experiment=cpu_ablation_quick",
            f"model.backbone.model_name={backbone}",
            "variant=p111",
            "pretrain=none",
            "steps=2",
            "data.num_train=8",
            "data.num_val=2",
            "data.batch_size=2",
            "trainer.val_check_interval=2",
            "num_threads=1",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        output_dir=tmp_path / "run",
    )
    metrics, objects = train(cfg)
    results = objects["results"]
    assert results["status"] == "ok" and 0.0 <= results["PQ"] <= 100.0
    assert objects["module"].model.backbone.model_name == backbone
    assert objects["trainer"].global_step == 2
