"""Shared set-up of the probes: compose the main job's config with a prepared data folder and its cached backbone.

Environment: PROSCALE_DATA (a data folder that `make train` filled: data/synthetic and data/pretrained_backbones);
the cached backbone is the newest regnetx_002-*.pt under it. Run from the repository root with the project's venv.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))


def data_dir() -> Path:
    folder = Path(os.environ.get("PROSCALE_DATA", REPO / "data"))
    if not (folder / "synthetic").is_dir():
        raise SystemExit(f"PROSCALE_DATA={folder}: no synthetic/ in it; run `make train` once, then point here")
    return folder


def cached_backbone(folder: Path) -> Path:
    found = sorted((folder / "pretrained_backbones").glob("regnetx_002-*.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no regnetx_002-*.pt under {folder / 'pretrained_backbones'}; run `make train` once")
    return found[-1]


def compose_main_job(*overrides: str, with_backbone: bool = True):
    from hydra import compose, initialize_config_dir

    folder = data_dir()
    base = ["experiment=cpu_synthetic", f"paths.data_dir={folder}"]
    if with_backbone:
        base += [f"model.backbone.pretrained={cached_backbone(folder)}", "pretrain=none"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=base + list(overrides))


def prepared_training(cfg, num_batches: int):
    """(module, optimizer, batches): the main job's Lightning module in train mode, its AdamW and ``num_batches``
    training batches loaded up front (so the probes time the step, not the data)."""
    import torch

    from proscale.tasks.run import build_datamodule_and_module

    torch.set_num_threads(2)
    datamodule, module = build_datamodule_and_module(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    optimizer = module.optimizer_factory(module.model)
    module.model.train()
    return module, optimizer, [next(loader) for _ in range(num_batches)]


def train_step(module, optimizer, batch) -> None:
    """One Mask2Former step as Lightning runs it: forward, criterion, backward, AdamW."""
    outputs = module.model(batch["images"])
    loss = module.criterion.total_loss(module.criterion(outputs, batch["targets"]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
