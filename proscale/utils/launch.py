"""How this process was launched (torchrun, SLURM, plain) and what follows from it for the run's folder.

A run started by ``torchrun`` or ``srun`` is several processes that each compose the Hydra config, and after a
failure (``torchrun --max-restarts``) or a SLURM requeue the same run starts again from scratch. Hydra's default
run folder is a timestamp, different in every process and every attempt, so neither the other ranks nor a
restarted attempt would find the run's checkpoints. Under these launchers the run folder is therefore named
after the launch instead (:func:`run_folder_name`, the ``run_folder`` resolver of ``conf/hydra/default.yaml``):

- ``run_id=NAME`` (config key) wins everywhere: ``.../runs/<experiment>/NAME``;
- torchrun: ``torchrun-<rdzv id>`` (``--rdzv-id``, the ``TORCHELASTIC_RUN_ID`` every worker and every restart
  sees); torchrun's default id ``none`` (static rendezvous, ``--master-addr``) becomes
  ``torchrun-<master addr>_<master port>``, shared by all nodes of the launch;
- SLURM (``srun`` task): ``slurm-<job id>[_<array task>]``, the same after ``scontrol requeue``;
- otherwise Hydra's timestamp.

A run in such a stable folder resumes from the newest of its own ``checkpoints/last.ckpt`` and Lightning's
``hpc_ckpt_<n>.ckpt`` (saved on SLURM's pre-timeout signal) without ``ckpt_path``
(:func:`own_resume_checkpoint`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TORCHRUN_ID_VAR = "TORCHELASTIC_RUN_ID"
# torchrun's --rdzv-id default: the same for every launch, so it cannot name a run on its own
TORCHRUN_DEFAULT_ID = "none"
HPC_CHECKPOINT_PATTERN = "hpc_ckpt_*.ckpt"


def under_torchrun() -> bool:
    return TORCHRUN_ID_VAR in os.environ


def under_slurm_task() -> bool:
    """A process started by ``srun`` inside a SLURM allocation (not an interactive shell job): the case Lightning's
    ``SLURMEnvironment`` takes over."""
    if under_torchrun() or "SLURM_NTASKS" not in os.environ or "SLURM_JOB_ID" not in os.environ:
        return False
    return os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _safe(name: str) -> str:
    """A single path component: anything but letters, digits, ``.``, ``_`` and ``-`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "_"


def launch_run_name(run_id: object = None) -> str | None:
    """The stable folder name of this launch (see the module docstring), or None for a plain process."""
    if run_id not in (None, "", "null", "None"):
        return _safe(str(run_id))
    if under_torchrun():
        rdzv_id = os.environ.get(TORCHRUN_ID_VAR, "")
        if rdzv_id in ("", TORCHRUN_DEFAULT_ID):
            rdzv_id = f"{os.environ.get('MASTER_ADDR', 'localhost')}_{os.environ.get('MASTER_PORT', '0')}"
        return f"torchrun-{_safe(rdzv_id)}"
    if under_slurm_task():
        array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job = f"{array_job}_{array_task}" if array_job and array_task else os.environ["SLURM_JOB_ID"]
        return f"slurm-{_safe(job)}"
    return None


def run_folder_name(timestamp: str, run_id: object = None) -> str:
    """Hydra resolver ``${run_folder:<timestamp>,<run_id>}``: the launch's stable name, else the timestamp."""
    return launch_run_name(run_id) or timestamp


def log_file_suffix() -> str:
    """Hydra resolver ``${rank_log_suffix:}``: ranks > 0 of an externally launched run (torchrun, srun) share the
    run folder with rank 0 and write ``<task>_rank<r>.log`` so their log lines do not interleave with its."""
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if under_slurm_task() else None)
    return f"_rank{rank}" if rank not in (None, "", "0") else ""


def register_resolvers() -> None:
    """Register ``run_folder`` and ``rank_log_suffix`` with OmegaConf (idempotent); needed before composing."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("run_folder", run_folder_name, replace=True)
    OmegaConf.register_new_resolver("rank_log_suffix", log_file_suffix, replace=True)


def own_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest (by modification time) of ``<output_dir>/checkpoints/last.ckpt`` and Lightning's
    ``<output_dir>/hpc_ckpt_<n>.ckpt``, or None: what a restarted or requeued attempt of the run continues from."""
    output_dir = Path(output_dir)
    candidates = [output_dir / "checkpoints" / "last.ckpt", *output_dir.glob(HPC_CHECKPOINT_PATTERN)]
    existing = [path for path in candidates if path.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def restart_count() -> int:
    """torchrun's restart counter of this worker group (0 on the first attempt and outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


# hydra/launcher choices that need the hydra-submitit-launcher plugin (conf/hydra/launcher/ and the plugin's own)
SUBMITIT_LAUNCHERS = ("slurm", "submitit_slurm", "submitit_local")


class MissingLauncherPluginError(ValueError):
    """A ``hydra/launcher=`` choice whose plugin is not installed."""


def submitit_plugin_available() -> bool:
    try:
        import hydra_plugins.hydra_submitit_launcher.submitit_launcher  # noqa: F401
        import submitit  # noqa: F401
    except ImportError:
        return False
    return True


def check_launcher_plugin(argv: list[str]) -> None:
    """Raise :class:`MissingLauncherPluginError` when the command line picks a submitit launcher
    (``hydra/launcher=slurm|submitit_slurm|submitit_local``) and the plugin cannot be imported; Hydra itself would
    only say that the config option does not exist, or fail deep inside the sweep."""
    for arg in argv:
        key, _, choice = arg.removeprefix("override ").removeprefix("+").partition("=")
        if key == "hydra/launcher" and choice in SUBMITIT_LAUNCHERS and not submitit_plugin_available():
            raise MissingLauncherPluginError(
                f"{key}={choice} runs the sweep through submitit, but the hydra-submitit-launcher plugin is not "
                "installed: pip install 'proscale[slurm]' (from a checkout: pip install -e '.[slurm]'), or run the "
                "sweep with the default launcher (drop the hydra/launcher override)."
            )
