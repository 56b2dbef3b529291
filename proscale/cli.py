"""Console scripts ``proscale-train`` / ``-eval`` / ``-predict`` / ``-export`` (also run by ``scripts/*.py``).

Each is a Hydra app over ``conf/`` (``train.yaml``, ``eval.yaml``, ``predict.yaml``, ``export.yaml``); every Hydra
override works, e.g. ``proscale-train experiment=cpu_synthetic trainer.max_steps=50`` or ``proscale-train -m seed=1,2``.
``PROJECT_ROOT`` (default: the repository holding this package) anchors ``paths.root_dir``; set
``PROSCALE_CONFIG_DIR`` to use another config tree.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = os.environ.get("PROSCALE_CONFIG_DIR") or str(REPO_ROOT / "conf")
os.environ.setdefault("PROJECT_ROOT", str(REPO_ROOT))
# No network at run time unless the user opts in: W&B logs offline, Hugging Face never queries the hub.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def apply_extras(cfg: DictConfig) -> None:
    """Optional start-up utilities (``cfg.extras``): silence warnings, print the config tree."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        from proscale.utils.rich_utils import print_config_tree

        print_config_tree(cfg, save_to=str(Path(cfg.paths.output_dir) / "config_tree.log"))


def _hydra_app(config_name: str, task: Callable[[DictConfig], tuple[dict, dict]]) -> Callable[[], Any]:
    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def main(cfg: DictConfig) -> float | None:
        from proscale.utils.cpu_memory import retain_freed_memory

        retain_freed_memory()  # large CPU activations reuse warm memory (see proscale/utils/cpu_memory.py)
        apply_extras(cfg)
        metrics, _ = task(cfg)
        # The value Hydra sweepers optimise (e.g. optimized_metric=val/PQ with an Optuna sweeper).
        name = cfg.get("optimized_metric")
        return metrics.get(name) if name else None

    return main


def train_main() -> None:
    from proscale.train import train

    _hydra_app("train", train)()


def eval_main() -> None:
    from proscale.evaluate import evaluate

    _hydra_app("eval", evaluate)()


def predict_main() -> None:
    from proscale.predict import predict

    _hydra_app("predict", predict)()


def export_main() -> None:
    from proscale.export.task import export

    _hydra_app("export", export)()
