"""SetCriterion: hand-checked loss pieces, parity with Hugging Face's Mask2FormerLoss, empty targets, DDP."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from proscale.models.criterion import SetCriterion, dice_loss, sigmoid_bce_loss
from proscale.models.point_sampling import point_sample, sample_uncertain_points

NUM_CLASSES = 5
BASE_KEYS = ("loss_ce", "loss_mask", "loss_dice")


def _prediction(batch, num_queries, h, w, requires_grad=False):
    return {
        "pred_logits": (torch.randn(batch, num_queries, NUM_CLASSES + 1) * 2).requires_grad_(requires_grad),
        "pred_masks": (torch.randn(batch, num_queries, h, w) * 3).requires_grad_(requires_grad),
    }


def _outputs(batch=3, num_queries=8, h=8, w=12, num_aux=2, requires_grad=False):
    outputs = _prediction(batch, num_queries, h, w, requires_grad)
    outputs["aux_outputs"] = [_prediction(batch, num_queries, h, w, requires_grad) for _ in range(num_aux)]
    return outputs


def _targets(counts, h, w):
    """Targets at the padded input size (4x the mask size) with ``counts[b]`` segments in image b."""
    return [{"labels": torch.randint(0, NUM_CLASSES, (n,)), "masks": torch.rand(n, 4 * h, 4 * w) > 0.5} for n in counts]


def _expected_keys(num_aux):
    return set(BASE_KEYS) | {f"{k}_{i}" for i in range(num_aux) for k in BASE_KEYS}


def test_bce_and_dice_on_known_inputs():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), math.log(3.0)]])  # probs 0.5 and 0.75
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # mask 0: ln 2 per point; mask 1: -ln 0.75 per point; sum over masks / num_masks(=2)
    assert sigmoid_bce_loss(logits, labels, 2.0).item() == pytest.approx((math.log(2) - math.log(0.75)) / 2, abs=1e-6)
    # mask 0: 1 - (2*0.5 + 1)/(1 + 1 + 1) = 1/3; mask 1: 1 - (2*1.5 + 1)/(1.5 + 2 + 1) = 1/9
    assert dice_loss(logits, labels, 2.0).item() == pytest.approx((1 / 3 + 1 / 9) / 2, abs=1e-6)


def test_point_sample_reads_the_same_location_at_any_resolution():
    coarse = torch.zeros(1, 1, 4, 4)
    coarse[..., 1, 2] = 1.0  # cell (row 1, col 2) covers x in [0.5, 0.75), y in [0.25, 0.5)
    fine = coarse.repeat_interleave(4, 2).repeat_interleave(4, 3)  # same picture at 16x16
    centre = torch.tensor([[[0.625, 0.375]]])  # (x, y) at the centre of that cell
    assert point_sample(coarse, centre).item() == pytest.approx(1.0)
    assert point_sample(fine, centre).item() == pytest.approx(1.0)


def test_uncertain_points_prefer_small_logits():
    torch.manual_seed(0)
    logits = torch.full((1, 1, 16, 16), 10.0)
    logits[..., :, 8:] = 0.0  # right half is uncertain
    coords = sample_uncertain_points(logits, num_points=100, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert coords.shape == (1, 100, 2)
    # the 75 importance points come from the right half (x >= 0.5 up to bilinear blending at the edge)
    assert (coords[0, :75, 0] > 0.45).all()
    assert coords.min() >= 0 and coords.max() <= 1


def test_no_object_weight_in_cross_entropy():
    # One target, two queries: query 0 predicts it perfectly, query 1 predicts nothing -> query 0 is matched.
    h = w = 4
    mask = torch.zeros(1, 4 * h, 4 * w, dtype=torch.bool)
    mask[0, :8] = True
    pred_masks = torch.full((1, 2, h, w), -10.0)
    pred_masks[0, 0, :2] = 10.0
    pred_logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.0, 0.0, 0.3]]])
    criterion = SetCriterion(NUM_CLASSES, eos_coef=0.1, num_points=64)
    losses = criterion(
        {"pred_logits": pred_logits, "pred_masks": pred_masks}, [{"labels": torch.tensor([0]), "masks": mask}]
    )
    log_probs = pred_logits[0].log_softmax(-1)
    expected = -(1.0 * log_probs[0, 0] + 0.1 * log_probs[1, NUM_CLASSES]) / (1.0 + 0.1)
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert set(losses) == set(BASE_KEYS)


def test_total_loss_weights_every_key():
    torch.manual_seed(0)
    outputs = _outputs(batch=2, num_aux=3)
    criterion = SetCriterion(NUM_CLASSES, num_points=100)
    losses = criterion(outputs, _targets([2, 1], 8, 12))
    assert set(losses) == _expected_keys(3)
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    expected = sum(weights[k.rstrip("0123456789").rstrip("_")] * v for k, v in losses.items())
    assert criterion.total_loss(losses).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss_bbox"):
        criterion.total_loss({"loss_bbox": torch.tensor(1.0)})


@pytest.mark.parametrize("counts", [[3, 0, 4], [1, 2, 1]])
def test_parity_with_hugging_face_loss(counts):
    import transformers.models.mask2former.modeling_mask2former as hf
    from transformers import Mask2FormerConfig

    torch.manual_seed(0)
    h, w, num_aux, num_points = 8, 12, 2, 300
    outputs = _outputs(batch=len(counts), h=h, w=w, num_aux=num_aux, requires_grad=True)
    targets = _targets(counts, h, w)
    config = Mask2FormerConfig(
        num_labels=NUM_CLASSES,
        train_num_points=num_points,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    weight_dict = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    reference = hf.Mask2FormerLoss(config, weight_dict)
    ours = SetCriterion(NUM_CLASSES, num_points=num_points)

    # Both draw their random points in the same order with the same shapes, so one seed gives the same points.
    torch.manual_seed(1234)
    hf_losses = reference(
        outputs["pred_masks"],
        outputs["pred_logits"],
        [t["masks"].float() for t in targets],
        [t["labels"] for t in targets],
        [
            {"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
            for a in outputs["aux_outputs"]
        ],
    )
    hf_losses = {k.replace("loss_cross_entropy", "loss_ce"): v for k, v in hf_losses.items()}
    torch.manual_seed(1234)
    our_losses = ours(outputs, targets)

    assert set(our_losses) == set(hf_losses) == _expected_keys(num_aux)
    for key in our_losses:
        assert abs(our_losses[key].item() - hf_losses[key].item()) < 1e-4, key
    # HF's own rule: a weight applies to every key containing its name (so also to the auxiliary keys).
    hf_total = sum(
        w * v
        for name, w in weight_dict.items()
        for k, v in hf_losses.items()
        if name in k.replace("loss_ce", "loss_cross_entropy")
    )
    our_total = ours.total_loss(our_losses)
    assert abs(our_total.item() - hf_total.item()) < 1e-4

    # Same gradients too.
    leaves = [outputs["pred_logits"], outputs["pred_masks"]]
    hf_grads = torch.autograd.grad(hf_total, leaves, retain_graph=True)
    our_grads = torch.autograd.grad(our_total, leaves)
    for ours_g, hf_g in zip(our_grads, hf_grads):
        assert torch.allclose(ours_g, hf_g, atol=1e-5)


def test_targets_at_different_resolution_than_predictions():
    # A prediction equal to its target (up to resolution) gives a lower mask loss than a shifted one,
    # whatever the target resolution: points are sampled in normalized coordinates.
    torch.manual_seed(0)
    h = w = 8
    pred_masks = torch.full((1, 1, h, w), -12.0)
    pred_masks[0, 0, :, :4] = 12.0
    for scale in (1, 4, 8):
        mask = torch.zeros(1, h * scale, w * scale, dtype=torch.bool)
        mask[0, :, : 4 * scale] = True
        shifted = torch.zeros_like(mask)
        shifted[0, :, 2 * scale : 6 * scale] = True
        criterion = SetCriterion(NUM_CLASSES, num_points=400, importance_sample_ratio=0.0)  # uniform points
        out = {"pred_logits": torch.zeros(1, 1, NUM_CLASSES + 1), "pred_masks": pred_masks}
        aligned = criterion(out, [{"labels": torch.tensor([0]), "masks": mask}])
        misaligned = criterion(out, [{"labels": torch.tensor([0]), "masks": shifted}])
        # measured: aligned 0.06 / 0.02 / 0.01 (soft edges), shifted by a quarter of the width ~0.45-0.5
        assert aligned["loss_dice"] < 0.1 and misaligned["loss_dice"] > 0.3


@pytest.mark.parametrize("counts", [[0, 2], [0, 0]])
def test_empty_targets_keep_keys_and_graph(counts):
    torch.manual_seed(0)
    outputs = _outputs(batch=2, num_aux=2, requires_grad=True)
    criterion = SetCriterion(NUM_CLASSES, num_points=100)
    losses = criterion(outputs, _targets(counts, 8, 12))
    assert set(losses) == _expected_keys(2)
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    criterion.total_loss(losses).backward()
    assert outputs["pred_masks"].grad is not None and outputs["pred_logits"].grad is not None
    assert outputs["aux_outputs"][1]["pred_masks"].grad is not None
    if sum(counts) == 0:
        assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
        assert criterion.num_masks(_targets(counts, 8, 12), torch.device("cpu")).item() == 1.0  # clamped


def test_bad_inputs_raise_value_error():
    criterion = SetCriterion(NUM_CLASSES, num_points=10)
    outputs = _outputs(batch=1, num_aux=0)
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(0)
    with pytest.raises(ValueError, match="pred_logits"):
        criterion({"pred_logits": torch.zeros(1, 8, 3), "pred_masks": outputs["pred_masks"]}, _targets([1], 8, 12))
    with pytest.raises(ValueError, match="targets"):
        criterion(outputs, _targets([1, 1], 8, 12))
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        criterion(outputs, [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(1, 32, 48)}])


# --- two processes (gloo) -------------------------------------------------------------------------------------

# Rank 0 has 3 target masks, rank 1 none: global count 3, normalizer 3 / world size = 1.5 on both ranks.
_RANK_COUNTS = {0: [2, 1], 1: [0, 0]}


def _ddp_worker(rank, world_size, workdir):
    dist.init_process_group("gloo", init_method=f"file://{workdir}/init", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)
        h, w = 4, 6
        model = torch.nn.Linear(3, (NUM_CLASSES + 1) + h * w)  # tiny stand-in producing logits and masks
        torch.manual_seed(0)
        model.reset_parameters()  # identical weights on both ranks
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(10 + rank)
        inputs = torch.randn(2, 4, 3)
        out = ddp_model(inputs)
        outputs = {
            "pred_logits": out[..., : NUM_CLASSES + 1],
            "pred_masks": out[..., NUM_CLASSES + 1 :].reshape(2, 4, h, w),
        }
        outputs["aux_outputs"] = [{k: v * 0.5 for k, v in outputs.items()}]
        targets = _targets(_RANK_COUNTS[rank], h, w)

        criterion = SetCriterion(NUM_CLASSES, num_points=50)
        normalizer = criterion.num_masks(targets, torch.device("cpu")).item()
        torch.manual_seed(99)
        losses = criterion(outputs, targets)
        torch.manual_seed(99)
        local = criterion._losses_of_one_prediction(
            outputs, targets, torch.tensor(float(max(sum(_RANK_COUNTS[rank]), 1)))
        )
        criterion.total_loss(losses).backward()  # would hang if the ranks' graphs disagreed
        grads = [p.grad.clone() for p in model.parameters()]
        torch.save(
            {
                "rank": rank,
                "normalizer": normalizer,
                "keys": sorted(losses),
                "loss_mask": losses["loss_mask"].item(),
                "local_loss_mask": local["loss_mask"].item(),
                "grads": grads,
            },
            f"{workdir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_num_masks_all_reduced_over_two_processes(tmp_path):
    # spawn, not fork: a child forked after the parent ran OpenMP kernels can deadlock.
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)}
    global_count = sum(sum(c) for c in _RANK_COUNTS.values())
    for rank in (0, 1):
        assert results[rank]["normalizer"] == pytest.approx(global_count / 2)
    assert results[0]["keys"] == results[1]["keys"] == sorted(_expected_keys(1))
    # Rank 0's mask loss is its mask-loss sum divided by the global normalizer 1.5, not by its own 3 masks.
    assert results[0]["loss_mask"] == pytest.approx(results[0]["local_loss_mask"] * 3 / 1.5, rel=1e-5)
    assert results[1]["loss_mask"] == 0.0
    for g0, g1 in zip(results[0]["grads"], results[1]["grads"]):
        assert torch.allclose(g0, g1)  # DDP averaged them: both ranks hold the same gradient
