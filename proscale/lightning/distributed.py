"""Data-parallel launch checks and the DDP strategy with bounded collectives.

- :func:`trainer_config_for_launch`: the trainer config as this machine can run it; ``sync_batchnorm`` (on in
  ``trainer=ddp``) is kept only where SyncBatchNorm exists, i.e. on CUDA devices, so the same ``trainer=ddp``
  runs on CPU (gloo) with ``trainer.accelerator=cpu``.
- :func:`module_config_for_precision`: the optimizer unfused where Lightning's mixed precision must clip its
  gradients (``trainer.precision=bf16-mixed|16-mixed`` with ``gradient_clip_val``).
- :func:`check_launch`: ``trainer.num_nodes`` / ``trainer.devices`` against the process layout torchrun started,
  and a ``MASTER_PORT`` that is already taken, each as a ``ValueError`` that says what to change, before any
  process waits for another.
- :class:`DDPStrategy`: Lightning's, with ``timeout_s`` for every collective (init, barrier, broadcast, reduce,
  gradient all-reduce). A collective that does not complete within it fails with :class:`CollectiveTimeoutError`
  naming the rank and the operation, instead of the job hanging until the cluster kills it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from omegaconf import DictConfig, open_dict

from proscale.utils.launch import restart_count, under_slurm_task, under_torchrun
from proscale.utils.logging_utils import get_logger

log = get_logger(__name__)

# Words of the errors gloo / NCCL / the TCP store raise when a peer is gone or a collective ran out of time.
_COMMUNICATION_FAILURE_MARKERS = (
    "timed out",
    "timeout",
    "connection closed",
    "connection reset",
    "broken pipe",
    "socket",
)


class CollectiveTimeoutError(RuntimeError):
    """A collective operation failed or exceeded ``timeout_s``; the message names the rank and the operation."""


def _uses_cuda(accelerator: Any) -> bool:
    name = str(accelerator).lower() if accelerator is not None else "auto"
    if name in ("gpu", "cuda"):
        return True
    return name == "auto" and torch.cuda.is_available()


def trainer_config_for_launch(trainer_cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg.trainer`` with ``sync_batchnorm`` switched off where the accelerator is not CUDA
    (SyncBatchNorm has no CPU implementation; plain BatchNorm then normalizes per process)."""
    trainer_cfg = trainer_cfg.copy()
    if trainer_cfg.get("sync_batchnorm") and not _uses_cuda(trainer_cfg.get("accelerator")):
        log.info(
            f"trainer.sync_batchnorm=true applies to CUDA devices only: off for accelerator "
            f"{trainer_cfg.get('accelerator')!r} (BatchNorm statistics stay per process)"
        )
        with open_dict(trainer_cfg):
            trainer_cfg.sync_batchnorm = False
    return trainer_cfg


def module_config_for_precision(module_cfg: DictConfig, trainer_cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg.module`` whose AdamW is not fused under mixed precision with gradient clipping: Lightning
    refuses to clip the gradients of an optimizer that unscales them itself (the fused kernels), and the recipe
    clips every step. ``module.optimizer.fused`` set explicitly is kept."""
    precision = str(trainer_cfg.get("precision"))
    optimizer = module_cfg.get("optimizer")
    if "mixed" not in precision or not trainer_cfg.get("gradient_clip_val") or optimizer is None:
        return module_cfg
    if optimizer.get("fused") is not None:
        return module_cfg
    module_cfg = module_cfg.copy()
    with open_dict(module_cfg):
        module_cfg.optimizer.fused = False
    return module_cfg


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def check_torchrun_layout(devices: Any, num_nodes: Any, environ: dict[str, str] | None = None) -> None:
    """Under torchrun: ``trainer.devices`` must equal ``--nproc-per-node`` and ``trainer.num_nodes`` ``--nnodes``."""
    env = os.environ if environ is None else environ
    world, local = _int_or_none(env.get("WORLD_SIZE")), _int_or_none(env.get("LOCAL_WORLD_SIZE"))
    if world is None or local is None or local < 1:
        return
    nodes = world // local
    devices, num_nodes = _int_or_none(devices), _int_or_none(num_nodes)
    problems = []
    if num_nodes is not None and num_nodes != nodes:
        problems.append(f"trainer.num_nodes={num_nodes} but torchrun started {nodes} node(s) (--nnodes)")
    if devices is not None and devices > 0 and devices != local:
        problems.append(
            f"trainer.devices={devices} but torchrun started {local} process(es) per node (--nproc-per-node)"
        )
    if problems:
        raise ValueError(
            "; ".join(problems) + f" (WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local}). Set trainer.num_nodes={nodes} "
            f"trainer.devices={local}, or launch torchrun with --nnodes {num_nodes} --nproc-per-node {devices}."
        )


def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound (another process listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host if host not in ("localhost", "") else "127.0.0.1", port))
        except OSError:
            return True
    return False


def check_master_port(environ: dict[str, str] | None = None) -> None:
    """When Lightning starts the processes itself (not torchrun / srun) from a fixed ``MASTER_PORT``, the node
    that hosts the rendezvous must be able to listen on it; otherwise the other ranks would wait for it."""
    env = os.environ if environ is None else environ
    if "MASTER_PORT" not in env or "LOCAL_RANK" in env or env.get("NODE_RANK", "0") != "0":
        return
    port = _int_or_none(env["MASTER_PORT"])
    if port is None or not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={env['MASTER_PORT']!r} is not a port number (1-65535)")
    host = env.get("MASTER_ADDR", "127.0.0.1")
    if port_in_use(host, port):
        raise ValueError(
            f"MASTER_PORT={port} on {host} is already in use by another process: choose a free port "
            "(MASTER_PORT=... for Lightning's launcher, --master-port / --rdzv-endpoint for torchrun)"
        )


def check_launch(cfg: DictConfig) -> None:
    """Fail fast, before any rank waits for another, when the config does not fit how the job was launched."""
    trainer = cfg.trainer
    if under_torchrun():
        check_torchrun_layout(trainer.get("devices"), trainer.get("num_nodes"))
        return
    if under_slurm_task():
        return  # Lightning's SLURMEnvironment checks devices / num_nodes against SLURM's layout
    strategy = trainer.get("strategy")
    strategy_name = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy
    devices, nodes = _int_or_none(trainer.get("devices")), _int_or_none(trainer.get("num_nodes")) or 1
    several_processes = devices is None or devices != 1 or nodes > 1  # None: "auto" / a device list
    if "ddp" in str(strategy_name).lower() and several_processes:
        check_master_port()


def attempt_store(timeout: timedelta | None) -> torch.distributed.Store | None:
    """Under torchrun's agent store: a client of it whose keys are prefixed with this restart attempt, else None.

    torch prefixes the process group's keys per attempt only when the rendezvous creates a new store per round;
    the static rendezvous (``--master-addr``/``--master-port``, torchrun's default) keeps one store for all
    attempts, so after ``--max-restarts`` a restarted rank would read the dead ranks' gloo addresses from the
    previous attempt and fail with "Connection refused"."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    client = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout or timedelta(minutes=30),
    )
    return torch.distributed.PrefixStore(f"/proscale/attempt_{restart_count()}", client)


class DDPStrategy(LightningDDPStrategy):
    """Lightning's ``DDPStrategy`` whose collectives are bounded by ``timeout_s`` seconds.

    The timeout goes to the process group (gloo fails a collective that waits longer; NCCL's watchdog aborts it),
    and a failed barrier / broadcast / reduce / all-gather / gradient all-reduce is re-raised as
    :class:`CollectiveTimeoutError` with the rank and the operation in the message.
    """

    def __init__(self, timeout_s: float | None = 1800.0, **kwargs: Any) -> None:
        if timeout_s is not None:
            if timeout_s <= 0:
                raise ValueError(f"trainer.strategy.timeout_s must be > 0 seconds, got {timeout_s}")
            kwargs["timeout"] = timedelta(seconds=float(timeout_s))
        super().__init__(**kwargs)
        self.timeout_s = timeout_s

    @contextlib.contextmanager
    def _named(self, operation: str) -> Iterator[None]:
        try:
            yield
        except CollectiveTimeoutError:
            raise
        except Exception as error:
            text = str(error).lower()
            if not isinstance(error, torch.distributed.DistError) and not any(
                marker in text for marker in _COMMUNICATION_FAILURE_MARKERS
            ):
                raise
            limit = f"{self.timeout_s:g} s" if self.timeout_s is not None else "the default timeout"
            rank, world = self.global_rank, self.world_size
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            raise CollectiveTimeoutError(
                f"rank {rank}/{world}: {operation} did not complete (limit "
                f"trainer.strategy.timeout_s = {limit}; a peer process died, hangs or runs different code): "
                f"{type(error).__name__}: {str(error).strip()[:500]}"
            ) from error

    def setup_distributed(self) -> None:
        with self._named("process-group initialisation (rendezvous)"):
            store = attempt_store(self._timeout)
            if store is None:
                super().setup_distributed()
                return
            # Lightning's setup_distributed, with the process group's store given explicitly
            reset_seed()
            self.set_world_ranks()
            self._process_group_backend = self._get_process_group_backend()
            kwargs: dict[str, Any] = {"timeout": self._timeout, "store": store}
            if self.root_device.type != "cpu":
                kwargs["device_id"] = self.root_device
            _init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        name = args[0] if args else kwargs.get("name")
        with self._named(f"barrier{f' {name!r}' if name else ''}"):
            super().barrier(*args, **kwargs)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        with self._named(f"broadcast from rank {src}"):
            return super().broadcast(obj, src)

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        with self._named(f"all-reduce ({reduce_op})"):
            return super().reduce(tensor, group=group, reduce_op=reduce_op)

    def all_gather(self, tensor: Any, group: Any | None = None, sync_grads: bool = False) -> Any:
        with self._named("all-gather"):
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        with self._named("gradient all-reduce (backward)"):
            return super().backward(*args, **kwargs)
