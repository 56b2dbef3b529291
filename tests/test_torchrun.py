"""DDP launched as users launch it: `torchrun` running `scripts/train.py trainer=ddp` on the CPU (gloo).

Two layouts, each compared with one process that trains on the same global batch (2 images) with the same seed:

- 2 "nodes" x 1 process on the loopback address: two torchrun invocations (`--node-rank 0/1`), exactly the
  command of the README with `trainer.accelerator=cpu trainer.devices=1 trainer.num_nodes=2 trainer.precision=32`;
- 1 node x 2 processes (`--nproc-per-node 2`).

The final weights after 4 steps agree within 1e-5. As in tests/test_ddp.py (read its docstring), oneDNN is off
and the criterion's random points are fixed (`proscale.testing.callbacks.BatchInvariantRun`), BatchNorm is frozen,
and the no-object weight is 1 so the class loss normalisation is exact. AdamW runs with eps=1 (then its update is
~lr x gradient): with the default eps=1e-8 the first update is lr x sign(gradient), and a gradient that is 0 up
to rounding would move a weight by lr in either direction. Each run also shows: one run folder shared by the
ranks, checkpoints written by rank 0 only, one results.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.launch import (
    TRAIN,
    assert_complete_files,
    assert_weights_close,
    finish,
    free_port,
    global_step,
    python,
    run,
    short_run,
    start,
    state_dict,
    torchrun,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # each torchrun layout: 2 training processes, ~45 s on an idle 2-core machine

STEPS = 4


def _overrides(tmp: Path, name: str) -> list[str]:
    return [
        # the whole dataset (2 images) is the global batch: the data order cannot differ between runs
        *short_run(tmp, num_train=2, steps=STEPS),
        "+model.backbone.freeze_bn=true",
        "module.criterion.eos_coef=1.0",
        "module.optimizer.lr=0.05",
        "+module.optimizer.eps=1.0",
        "+callbacks.invariant._target_=proscale.testing.callbacks.BatchInvariantRun",
        f"+callbacks.invariant.out_dir={tmp / name}",
        "+callbacks.record._target_=proscale.testing.callbacks.RecordCheckpointWrites",
        f"+callbacks.record.out_dir={tmp / name}",
    ]


DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[Path, Path]:
    """One process, batch 2: (its last.ckpt, its initial weights)."""
    tmp = tmp_path_factory.mktemp("single")
    run_dir = tmp / "run"
    overrides = [*_overrides(tmp, "single"), "trainer=cpu", "data.batch_size=2", f"hydra.run.dir={run_dir}"]
    code, output = run(python(TRAIN, *overrides))
    assert code == 0, output[-4000:]
    return run_dir / "checkpoints" / "last.ckpt", tmp / "single" / "initial_weights.pt"


def _check_ddp_run(tmp: Path, name: str, single: tuple[Path, Path]) -> None:
    runs = tmp / "logs" / "train" / "runs" / "tiny"
    folders = sorted(runs.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("torchrun-"), folders  # one folder for all ranks
    run_dir = folders[0]
    assert_complete_files(run_dir)
    assert [p.name for p in run_dir.rglob("results.json")] == ["results.json"]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"
    assert (run_dir / "train.log").is_file() and (run_dir / "train_rank1.log").is_file()

    # checkpoints: written by rank 0 only (rank 1 recorded none)
    records = tmp / name
    assert not (records / "checkpoint_writes_rank1.txt").exists()
    written = (records / "checkpoint_writes_rank0.txt").read_text().split("\n")
    assert any(line.endswith("last.ckpt") for line in written)

    last = run_dir / "checkpoints" / "last.ckpt"
    assert global_step(last) == STEPS
    single_last, single_initial = single
    assert global_step(single_last) == STEPS
    initial = torch.load(single_initial, weights_only=False)
    torch.testing.assert_close(torch.load(records / "initial_weights.pt", weights_only=False), initial)  # same seed
    expected, actual = state_dict(single_last), state_dict(last)
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected if expected[k].is_floating_point())
    assert moved > 1e-3  # the comparison is not between untouched initial weights
    assert_weights_close(actual, expected, atol=1e-5)


def test_two_loopback_nodes_match_single_process(tmp_path, single_process):
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    script = [
        TRAIN,
        *_overrides(tmp_path, "ddp"),
        *DDP_CPU,
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "data.batch_size=1",
    ]
    nodes = [start(torchrun(*common, "--node-rank", str(rank), *script)) for rank in (0, 1)]
    outcomes = [finish(node) for node in nodes]
    for code, output in outcomes:
        assert code == 0, output[-4000:]
    assert (
        "sync_batchnorm=true applies to CUDA devices only"
        in (tmp_path / "logs").joinpath("train", "runs", "tiny", f"torchrun-127.0.0.1_{port}", "train.log").read_text()
    )
    _check_ddp_run(tmp_path, "ddp", single_process)


def test_two_processes_one_node_match_single_process(tmp_path, single_process):
    port = free_port()
    script = [
        TRAIN,
        *_overrides(tmp_path, "ddp"),
        *DDP_CPU,
        "trainer.devices=2",
        "trainer.num_nodes=1",
        "data.batch_size=1",
    ]
    args = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "--rdzv-id", "job42"]
    code, output = run(torchrun(*args, *script))
    assert code == 0, output[-4000:]
    assert (tmp_path / "logs" / "train" / "runs" / "tiny" / "torchrun-job42").is_dir()
    _check_ddp_run(tmp_path, "ddp", single_process)
