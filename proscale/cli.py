"""The apps: ``proscale <train|eval|predict|export>``, ``python -m proscale <app>``, ``proscale-train`` / ``proscale-eval`` /
``proscale-predict`` / ``proscale-export``, and ``scripts/*.py``: all the same Hydra apps.

Each is a Hydra app over the config tree (``train.yaml``, ``eval.yaml``, ``predict.yaml``, ``export.yaml``); every Hydra override
works, e.g. ``proscale train experiment=cpu_synthetic trainer.max_steps=50`` or ``proscale train -m seed=1,2``.
The config tree is the checkout's ``conf/`` or, when installed, the copy inside the package; ``PROSCALE_CONFIG_DIR``
replaces it and ``PROSCALE_CONFIG_PATH`` adds user config folders (see :mod:`proscale.config_paths`).
``PROJECT_ROOT`` (default: the checkout, else the working directory) anchors ``paths.root_dir`` (``logs/``, ``data/``).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from proscale.config_paths import REPO_ROOT, config_dir, default_project_root, register_search_path_plugin  # noqa: F401
from proscale.utils.launch import MissingLauncherPluginError, check_launcher_plugin, register_resolvers

CONFIG_DIR = config_dir()
os.environ.setdefault("PROJECT_ROOT", str(default_project_root()))
register_search_path_plugin()
# No network at run time unless the user opts in: W&B logs offline, Hugging Face never queries the hub.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
register_resolvers()  # ${run_folder:...} / ${rank_log_suffix:} of conf/hydra/default.yaml
from proscale.utils.threads import apply_thread_env_defaults  # noqa: E402

# OpenMP threads sleep instead of spin-waiting when idle (must precede torch's import; proscale/utils/threads.py).
apply_thread_env_defaults()


def apply_extras(cfg: DictConfig) -> None:
    """Optional start-up utilities (``cfg.extras``): silence warnings, print the config tree."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        from proscale.utils.rich_utils import print_config_tree

        print_config_tree(cfg, save_to=str(Path(cfg.paths.output_dir) / "config_tree.log"))


def run_reporting_errors(task: Callable[[DictConfig], tuple[dict, dict]], cfg: DictConfig) -> tuple[dict, dict]:
    """Run ``task(cfg)``; a failure ends the process with one message and exit status 1 (130 / 143 after
    SIGINT / SIGTERM) instead of Hydra's traceback. The traceback is in ``results.json``; ``HYDRA_FULL_ERROR=1``
    or ``extras.full_traceback=true`` lets it through to the terminal as well."""
    from proscale.utils.task import error_message, interrupted_by, show_tracebacks

    try:
        return task(cfg)
    except BaseException as error:
        interruption = interrupted_by(error)
        if interruption is None and (show_tracebacks(cfg) or isinstance(error, SystemExit)):
            raise
        if not getattr(error, "reported", False):  # task_wrapper has logged it already
            print(f"error: {error_message(error)}", file=sys.stderr, flush=True)
        if interruption is not None:
            sys.exit(interruption.exit_code)
        sys.exit(1)


def _hydra_app(config_name: str, task_path: str, exit_status: Callable[[dict], int] | None = None) -> Callable[[], Any]:
    """The Hydra app of ``conf/<config_name>.yaml`` running ``task_path`` (``"module:function"``, imported only when
    the app runs, so that ``--help`` and ``--cfg`` answer without importing torch). ``exit_status(metrics)``, when
    given, turns the task's result into the process's exit status (e.g. predict: some images failed)."""
    if not (Path(CONFIG_DIR) / f"{config_name}.yaml").is_file():
        raise SystemExit(
            f"proscale: no {config_name}.yaml in the config directory {CONFIG_DIR} (set PROSCALE_CONFIG_DIR to a "
            "complete config tree, e.g. the repository's conf/, or unset it)"
        )
    try:  # a missing launcher plugin: one clear line instead of Hydra's "option not found" or a failed sweep
        check_launcher_plugin(sys.argv[1:])
    except MissingLauncherPluginError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def main(cfg: DictConfig) -> float | None:
        from proscale.utils.cpu_memory import retain_freed_memory

        retain_freed_memory()  # large CPU activations reuse warm memory (see proscale/utils/cpu_memory.py)
        apply_extras(cfg)
        module_name, function_name = task_path.split(":")
        task: Callable[[DictConfig], tuple[dict, dict]] = getattr(importlib.import_module(module_name), function_name)
        metrics, _ = run_reporting_errors(task, cfg)
        if exit_status is not None and exit_status(metrics):
            raise SystemExit(exit_status(metrics))  # e.g. predict: some images failed (the others are written)
        # The value Hydra sweepers optimise (e.g. optimized_metric=val/PQ with an Optuna sweeper).
        name = cfg.get("optimized_metric")
        return metrics.get(name) if name else None

    return main


def train_main() -> None:
    _hydra_app("train", "proscale.tasks.train:train")()


def eval_main() -> None:
    _hydra_app("eval", "proscale.tasks.eval:evaluate")()


def predict_main() -> None:
    _hydra_app("predict", "proscale.tasks.predict:predict", _predict_exit_status)()


def _predict_exit_status(metrics: dict) -> int:
    from proscale.tasks.predict import EXIT_SOME_FAILED

    return EXIT_SOME_FAILED if metrics.get("failed") else 0


def export_main() -> None:
    _hydra_app("export", "proscale.export.task:export")()


# `proscale <app>` / `python -m proscale <app>` (proscale/__main__.py): name -> (entry point, one-line summary).
# Each app's `--help` (conf/hydra/help/<app>.yaml) says what it does and lists its main options.
APPS: dict[str, tuple[Callable[[], None], str]] = {
    "train": (train_main, "train a model (Hydra overrides, -m for sweeps), then test its best checkpoint"),
    "eval": (eval_main, "score weights (a checkpoint or another format) on the test split, else validation"),
    "predict": (predict_main, "segment images: overlays, COCO panoptic / instance JSON, semantic PNGs"),
    "export": (export_main, "export weights to ONNX (fixed or dynamic size) or a torch.export program (.pt2)"),
}
