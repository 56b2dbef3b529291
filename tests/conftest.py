"""Shared pytest set-up: deterministic seeds, headless plotting, offline W&B, no hub access."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests are skipped where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_wandb_cfg(tmp_path):
    """A factory of train configs: the tiny preset for ``steps`` steps with offline W&B logging, everything under
    ``tmp_path`` (run folder ``tmp_path / "run"``), no compute statistics, plus ``overrides``."""
    from proscale.utils.hydra_utils import compose_config

    def make(steps: int, *overrides: str):
        return compose_config(
            "train",
            [
                "experiment=tiny",
                f"steps={steps}",
                "num_threads=1",
                "logger=wandb",
                "trainer.enable_progress_bar=false",
                f"paths.log_dir={tmp_path / 'logs'}",
                f"paths.data_dir={tmp_path / 'data'}",
                "callbacks.compute_stats=null",
                *overrides,
            ],
            output_dir=tmp_path / "run",
        )

    return make
