"""Hungarian matcher: optimality vs brute force, cost pieces by hand, HF parity, images without targets."""

import itertools
import math

import pytest
import torch

from proscale.models.matcher import HungarianMatcher, pairwise_dice, pairwise_sigmoid_bce


def _random_image(num_queries, num_targets, num_classes=4, mask_size=(6, 8), scale=4):
    h, w = mask_size
    outputs = {
        "pred_logits": torch.randn(1, num_queries, num_classes + 1) * 2,
        "pred_masks": torch.randn(1, num_queries, h, w) * 3,
    }
    target = {
        "labels": torch.randint(0, num_classes, (num_targets,)),
        "masks": torch.rand(num_targets, h * scale, w * scale) > 0.5,
    }
    return outputs, [target]


def _brute_force_min_cost(cost: torch.Tensor) -> float:
    """Minimum total cost over all one-to-one assignments of min(Q, N) pairs."""
    num_queries, num_targets = cost.shape
    if num_targets <= num_queries:
        return min(
            sum(cost[q, n].item() for n, q in enumerate(perm))
            for perm in itertools.permutations(range(num_queries), num_targets)
        )
    return min(
        sum(cost[q, n].item() for q, n in enumerate(perm))
        for perm in itertools.permutations(range(num_targets), num_queries)
    )


@pytest.mark.parametrize("num_queries,num_targets", [(5, 3), (4, 4), (6, 1), (3, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_is_optimal_against_brute_force(num_queries, num_targets, seed):
    torch.manual_seed(seed)
    outputs, targets = _random_image(num_queries, num_targets)
    matcher = HungarianMatcher(num_points=200)
    torch.manual_seed(100)
    (query_idx, target_idx), *_ = matcher(outputs, targets)
    torch.manual_seed(100)  # same sampled points -> same cost matrix as the one forward used
    cost = matcher.cost_matrix(
        outputs["pred_logits"][0], outputs["pred_masks"][0], targets[0]["labels"], targets[0]["masks"]
    )
    assert len(query_idx) == len(target_idx) == min(num_queries, num_targets)
    assert len(set(query_idx.tolist())) == len(query_idx) and len(set(target_idx.tolist())) == len(target_idx)
    matched_cost = cost[query_idx, target_idx].sum().item()
    assert matched_cost == pytest.approx(_brute_force_min_cost(cost), abs=1e-5)


def test_pairwise_costs_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), -math.log(3.0)]])  # probs [.5,.5] and [.75,.25]
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    bce = pairwise_sigmoid_bce(logits, targets)
    # query 0: every point costs ln 2 whatever the target
    assert torch.allclose(bce[0], torch.full((2,), math.log(2.0)))
    # query 1 vs target [1, 0]: -(ln .75 + ln .75)/2 ; vs [1, 1]: -(ln .75 + ln .25)/2
    assert bce[1, 0].item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert bce[1, 1].item() == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, abs=1e-6)
    dice = pairwise_dice(logits, targets)
    # query 0 vs [1, 0]: 1 - (2*.5 + 1) / (1 + 1 + 1) = 1/3 ; vs [1, 1]: 1 - (2*1 + 1)/(1 + 2 + 1) = 1/4
    assert dice[0, 0].item() == pytest.approx(1 / 3, abs=1e-6)
    assert dice[0, 1].item() == pytest.approx(1 / 4, abs=1e-6)
    # query 1 vs [1, 0]: 1 - (2*.75 + 1)/(1 + 1 + 1) = 1/6
    assert dice[1, 0].item() == pytest.approx(1 / 6, abs=1e-6)


def test_class_cost_only_matches_by_probability():
    # Equal masks everywhere: only the class term decides. Query q is most confident about class q.
    logits = torch.full((1, 3, 4), -5.0)
    for q in range(3):
        logits[0, q, q] = 5.0
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 3, 4, 4)}
    targets = [{"labels": torch.tensor([2, 0, 1]), "masks": torch.ones(3, 16, 16, dtype=torch.bool)}]
    (query_idx, target_idx), *_ = HungarianMatcher(num_points=50)(outputs, targets)
    pairs = dict(zip(target_idx.tolist(), query_idx.tolist()))
    assert pairs == {0: 2, 1: 0, 2: 1}


def test_recovers_permutation_of_perfect_predictions():
    torch.manual_seed(3)
    num_classes, h, w = 3, 8, 8
    target_masks = torch.zeros(4, 4 * h, 4 * w, dtype=torch.bool)
    target_masks[0, :16, :16] = True
    target_masks[1, :16, 16:] = True
    target_masks[2, 16:, :16] = True
    target_masks[3, 16:, 16:] = True
    labels = torch.tensor([0, 0, 1, 2])  # two targets share a class: only masks can tell them apart
    permutation = torch.tensor([3, 0, 5, 1])  # query holding each target
    pred_masks = torch.full((1, 6, h, w), -8.0)
    pred_logits = torch.full((1, 6, num_classes + 1), -4.0)
    pred_logits[0, :, -1] = 4.0
    for t, q in enumerate(permutation.tolist()):
        small = target_masks[t].float().view(h, 4, w, 4).mean((1, 3))
        pred_masks[0, q] = small * 16.0 - 8.0
        pred_logits[0, q, labels[t]] = 6.0
    outputs = {"pred_logits": pred_logits, "pred_masks": pred_masks}
    (query_idx, target_idx), *_ = HungarianMatcher()(outputs, [{"labels": labels, "masks": target_masks}])
    assert permutation[target_idx].tolist() == query_idx.tolist()


def test_images_without_targets():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_masks": torch.randn(2, 5, 6, 6)}
    targets = [
        {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 24, 24, dtype=torch.bool)},
        {"labels": torch.tensor([1, 2]), "masks": torch.rand(2, 24, 24) > 0.5},
    ]
    matches = HungarianMatcher(num_points=64)(outputs, targets)
    assert [len(q) for q, _ in matches] == [0, 2]
    assert matches[0][0].dtype == torch.int64 and matches[0][1].dtype == torch.int64


def test_same_indices_as_hugging_face_matcher():
    import transformers.models.mask2former.modeling_mask2former as hf
    torch.manual_seed(7)
    batch, num_queries, num_classes, h, w = 3, 8, 5, 6, 10
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes + 1),
        "pred_masks": torch.randn(batch, num_queries, h, w) * 2,
    }
    counts = [3, 0, 5]
    targets = [
        {"labels": torch.randint(0, num_classes, (n,)), "masks": torch.rand(n, 4 * h, 4 * w) > 0.6} for n in counts
    ]
    reference = hf.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=300)
    torch.manual_seed(11)
    expected = reference(
        outputs["pred_masks"],
        outputs["pred_logits"],
        [t["masks"].float() for t in targets],
        [t["labels"] for t in targets],
    )
    torch.manual_seed(11)
    ours = HungarianMatcher(num_points=300)(outputs, targets)
    for (q_ref, t_ref), (q, t) in zip(expected, ours):
        assert q.tolist() == q_ref.tolist() and t.tolist() == t_ref.tolist()


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(0.0, 0.0, 0.0)
