"""`trainer=ddp_sim` (2 CPU processes over gloo) computes the same first step as one process with the same global batch.

Both runs go through `train(cfg)` with the `tiny` preset on a 2-image dataset: one process with batch 2, or
`ddp_sim` (run as `ddp_spawn`, as pytest requires) with batch 1 per process. To compare numbers rather than
random streams, a callback fixes the criterion's random point draws to the same points in every process
(every row of every `torch.rand` call gets the same values), and BatchNorm is frozen (batch statistics of 2
images differ from those of 1 + 1; the paper's R50 uses frozen BN anyway).

The callback also turns oneDNN off, so that every image's forward pass is bitwise the same whether it shares a
batch with another image or not (`test_forward_is_bitwise_batch_invariant`). oneDNN picks its convolution
kernels by batch size: with it, the backbone's first conv already differs by ~5e-7 between batch 2 and batch 1.
Differences that small are harmless to the loss but not to the gradients, because the forward pass makes
discrete decisions (ReLU on/off, max-pool argmax, top-k point selection, Hungarian matching): one unit whose
pre-activation lies within the noise flips. That is what happened here with PRO-SCALE's TRC on (seed 0): one
ReLU of encoder layer 4's FFN had pre-activation -9.4e-7 in the batch-2 pass and +5.2e-7 in the batch-1 pass;
the loss agreed to 1e-7 but the gradients differed by up to 1.1e-2 (backbone conv1) and 9.5e-3 (8.6% of that
FFN layer's largest gradient), with or without DDP: batch 2 vs 2 x batch 1 in one process differs just the same.
With bitwise batch-invariant forward passes no decision can flip, and only the order of the gradient sums
differs between the runs (measured: <= 4e-7). Native (non-oneDNN) convolutions run image by image, so they are
batch-invariant; the rest of the model is too, now that TRC's gate no longer takes a batch-size-dependent GEMM
path (see ``TokenRecalibration.gate``).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from lightning.pytorch import Callback

from proscale.tasks.train import train
from proscale.testing.callbacks import same_points_rand
from proscale.utils.hydra_utils import compose_config

_real_rand = torch.rand


class FirstStepCapture(Callback):
    """Saves (per rank) the first step's loss and the gradients before clipping/optimizer step to ``out_dir``.

    While the run lasts (in every process: ``setup`` runs in each spawned rank), ``torch.rand`` draws the same
    points for every mask and oneDNN is off, so each image's forward pass is independent of its batch-mates.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.grads: dict[str, torch.Tensor] = {}
        self._mkldnn_was_enabled = torch.backends.mkldnn.enabled

    def setup(self, trainer, pl_module, stage) -> None:
        torch.rand = same_points_rand
        self._mkldnn_was_enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False

    def teardown(self, trainer, pl_module, stage) -> None:
        torch.rand = _real_rand
        torch.backends.mkldnn.enabled = self._mkldnn_was_enabled

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == 0 and not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1 and self.grads:
            path = Path(self.out_dir) / f"rank{trainer.global_rank}.pt"
            torch.save({"loss": outputs["loss"].detach(), "grads": self.grads}, path)
            self.grads = {}


def _first_step(tmp_path: Path, data_dir: Path, name: str, *overrides: str) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    cfg = compose_config(
        "train",
        [
            "experiment=tiny",
            "num_threads=1",
            "trainer.enable_progress_bar=false",
            f"paths.data_dir={data_dir}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "data.num_train=2",
            "data.num_val=2",
            "data.train_transforms=[]",
            "+model.backbone.freeze_bn=true",
            "steps=1",
            "test=false",
            "trainer.limit_val_batches=0",
            "callbacks.compute_stats.timing_runs=0",
            # The class loss is a weighted mean (no-object weight 0.1) normalized per process, as in the original:
            # with unequal object counts per image the ranks' denominators differ. Equal weights make it exact.
            "module.criterion.eos_coef=1.0",
            f"+callbacks.capture._target_={__name__}.FirstStepCapture",
            f"+callbacks.capture.out_dir={out}",
            *overrides,
        ],
        output_dir=out / "run",
    )
    train(cfg)
    return [torch.load(p, weights_only=False) for p in sorted(out.glob("rank*.pt"))]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model/encoder=m2f"],
        ["model/encoder=proscale"],
        ["model/encoder=proscale", "model.encoder.trc_layout=released"],
    ],
    ids=["m2f", "proscale", "proscale-released-trc"],
)
def test_forward_is_bitwise_batch_invariant(tmp_path, overrides):
    """The precondition of the DDP comparison: with oneDNN off, an image's outputs do not depend on its batch-mates
    (not even by 1 ulp), so no discrete decision can differ between batch 2 and 2 x batch 1."""
    cfg = compose_config(
        "train", ["experiment=tiny", "+model.backbone.freeze_bn=true", *overrides], output_dir=tmp_path
    )
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model, num_classes=3)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        both = model(images)
        alone = [model(images[i : i + 1]) for i in range(2)]
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(both[key], torch.cat([a[key] for a in alone]), atol=0, rtol=0)
    for layer, aux in enumerate(both["aux_outputs"]):
        for key in ("pred_logits", "pred_masks"):
            expected = torch.cat([a["aux_outputs"][layer][key] for a in alone])
            torch.testing.assert_close(aux[key], expected, atol=0, rtol=0)


@pytest.mark.parametrize("encoder", ["m2f", "proscale"])
def test_ddp_sim_first_step_matches_single_process(tmp_path, encoder, monkeypatch):
    # Lightning's spawn launcher leaves MASTER_PORT set in this process: a second launch would find it still taken
    monkeypatch.delenv("MASTER_PORT", raising=False)
    data_dir = tmp_path / "data"
    single = _first_step(tmp_path, data_dir, "single", "trainer=cpu", "data.batch_size=2", f"model/encoder={encoder}")
    ddp = _first_step(
        tmp_path,
        data_dir,
        "ddp",
        "trainer=ddp_sim",
        "trainer.strategy=ddp_spawn",
        "data.batch_size=1",
        f"model/encoder={encoder}",
    )
    assert len(single) == 1 and len(ddp) == 2
    # DDP averages gradients over ranks; the criterion normalizes by the global mask count, so the mean of the
    # per-rank losses is the global-batch loss and the averaged gradients are its gradients.
    mean_loss = (ddp[0]["loss"] + ddp[1]["loss"]) / 2
    assert mean_loss.item() == pytest.approx(single[0]["loss"].item(), abs=1e-5)
    assert not torch.allclose(ddp[0]["loss"], ddp[1]["loss"])  # the ranks really saw different images
    grads_single, grads_rank0, grads_rank1 = single[0]["grads"], ddp[0]["grads"], ddp[1]["grads"]
    assert set(grads_single) == set(grads_rank0) == set(grads_rank1)
    assert len(grads_single) > 50
    for name, grad in grads_single.items():
        torch.testing.assert_close(grads_rank0[name], grads_rank1[name], atol=0, rtol=0)  # all-reduced: identical
        torch.testing.assert_close(grads_rank0[name], grad, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


class NaNFirstStep(Callback):
    """Makes the first loss of rank 1 only NaN; records each rank's skip count and parameters at the end."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def setup(self, trainer, pl_module, stage) -> None:
        from proscale.models.criterion import SetCriterion

        real_total, rank, calls = SetCriterion.total_loss, trainer.global_rank, {"n": 0}

        def total_loss(criterion, losses):
            calls["n"] += 1
            value = real_total(criterion, losses)
            return value * float("nan") if rank == 1 and calls["n"] == 1 else value

        SetCriterion.total_loss = total_loss
        self._restore = lambda: setattr(SetCriterion, "total_loss", real_total)

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore()

    def on_train_end(self, trainer, pl_module) -> None:
        state = {"skipped": pl_module.nonfinite_total, "step": trainer.global_step}
        # parameters only: BatchNorm running statistics legitimately differ per rank (each sees its own images)
        state["weights"] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        torch.save(state, Path(self.out_dir) / f"nan_rank{trainer.global_rank}.pt")


@pytest.mark.slow  # spawned ranks: ~1 min on an idle 2-core machine
def test_ddp_nonfinite_loss_on_one_rank_is_skipped_on_all(tmp_path):
    out = tmp_path / "nan"
    out.mkdir()
    cfg = compose_config(
        "train",
        [
            "experiment=tiny",
            "num_threads=1",
            "trainer.enable_progress_bar=false",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "data.num_train=4",
            "data.batch_size=1",
            "steps=2",
            "test=false",
            "trainer.limit_val_batches=0",
            "callbacks.compute_stats.timing_runs=0",
            "trainer=ddp_sim",
            "trainer.strategy=ddp_spawn",
            f"+callbacks.nan._target_={__name__}.NaNFirstStep",
            f"+callbacks.nan.out_dir={out}",
        ],
        output_dir=out / "run",
    )
    train(cfg)
    ranks = [torch.load(out / f"nan_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [1, 1]  # rank 0's loss was finite, it skipped too
    for name, value in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], value, atol=0, rtol=0)  # ranks stayed in sync
