"""Bad launches fail fast with a message that says what to change: trainer.num_nodes / devices against torchrun's
layout, a MASTER_PORT already in use, and a collective that waits longer than trainer.strategy.timeout_s."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from helpers.launch import TINY, TRAIN, free_port, run, torchrun
from omegaconf import OmegaConf

from proscale.lightning.distributed import (
    CollectiveTimeoutError,
    DDPStrategy,
    check_master_port,
    check_torchrun_layout,
    trainer_config_for_launch,
)
from proscale.utils.launch import launch_run_name, log_file_suffix, own_resume_checkpoint


def test_num_nodes_not_matching_torchrun_names_both_numbers():
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
    check_torchrun_layout(1, 2, env)  # 2 nodes x 1 process: fits
    with pytest.raises(ValueError, match=r"trainer.num_nodes=3 but torchrun started 2 node\(s\).*trainer.num_nodes=2"):
        check_torchrun_layout(1, 3, env)
    with pytest.raises(ValueError, match=r"trainer.devices=4 but torchrun started 1 process\(es\) per node"):
        check_torchrun_layout(4, 2, env)


def test_num_nodes_mismatch_under_torchrun_stops_before_training(tmp_path):
    port = free_port()
    script = [TRAIN, *TINY, f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}", "trainer=ddp"]
    script += ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.precision=32"]
    start = time.perf_counter()
    code, output = run(torchrun("--nproc-per-node", "1", "--master-port", str(port), *script), timeout=300)
    assert code != 0
    assert "trainer.num_nodes=2 but torchrun started 1 node(s) (--nnodes)" in output
    assert time.perf_counter() - start < 240  # no rank waited for a missing peer


def test_master_port_in_use_is_reported():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"MASTER_PORT={port} on 127.0.0.1 is already in use"):
            check_master_port({"MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1"})
        check_master_port({"MASTER_PORT": str(port), "LOCAL_RANK": "1"})  # a child rank does not host the store
    check_master_port({"MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1"})  # free again
    with pytest.raises(ValueError, match="MASTER_PORT='http' is not a port number"):
        check_master_port({"MASTER_PORT": "http"})


def test_torchrun_with_its_port_in_use_fails_fast(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
        start = time.perf_counter()
        code, output = run(torchrun(*args, TRAIN, *TINY, f"paths.log_dir={tmp_path}"), timeout=300)
    assert code != 0 and time.perf_counter() - start < 240
    assert "address already in use" in output.lower() and str(port) in output


def test_sync_batchnorm_is_kept_on_cuda_only():
    cpu = trainer_config_for_launch(OmegaConf.create({"accelerator": "cpu", "sync_batchnorm": True}))
    gpu = trainer_config_for_launch(OmegaConf.create({"accelerator": "gpu", "sync_batchnorm": True}))
    assert cpu.sync_batchnorm is False and gpu.sync_batchnorm is True


def test_run_folder_is_named_after_the_launch(monkeypatch, tmp_path):
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launch_run_name() is None and log_file_suffix() == ""
    assert launch_run_name("my run/1") == "my_run_1"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "3")
    assert launch_run_name() == "torchrun-10.0.0.1_29500" and log_file_suffix() == "_rank3"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert launch_run_name() == "torchrun-job7"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert launch_run_name() == "slurm-123"
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: a plain process
    assert launch_run_name() is None

    assert own_resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"a")
    time.sleep(0.01)
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"b")
    assert own_resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"  # the newest


def _barrier_worker(rank: int, port: int, result_path: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=2)
    )
    if rank == 1:
        time.sleep(7)  # a hung peer: never enters the barrier
        return
    strategy = DDPStrategy(timeout_s=2)
    start = time.perf_counter()
    try:
        strategy.barrier("epoch end")
        message = "no error"
    except CollectiveTimeoutError as error:
        message = f"{time.perf_counter() - start:.1f}|{error}"
    with open(result_path, "w") as handle:
        handle.write(message)


# 2 spawned processes (~45 s measured at load 7 on 2 cores with a 12 s peer sleep; now 7 s)
def test_collective_waits_at_most_the_timeout_then_names_rank_and_operation(tmp_path):
    result = tmp_path / "result.txt"
    mp.start_processes(_barrier_worker, args=(free_port(), str(result)), nprocs=2, start_method="spawn")
    waited, message = result.read_text().split("|", 1)
    assert float(waited) < 6
    assert message.startswith("rank 0/2: barrier 'epoch end' did not complete (limit trainer.strategy.timeout_s = 2 s")


def test_strategy_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        DDPStrategy(timeout_s=0)
