"""Mask2FormerInference: hand-built panoptic cases, semantic vs a direct computation, instance top-k, sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from proscale.models.inference import Mask2FormerInference, masks_to_original_size

NUM_CLASSES = 3  # class 0 is a thing, classes 1 and 2 are stuff
ON, OFF = 10.0, -10.0


def _class_logits(probabilities):
    """(Q, K+1) logits whose softmax is exactly ``probabilities`` (rows summing to 1)."""
    return torch.tensor(probabilities, dtype=torch.float32).log()


def _confident(cls, p=0.95):
    row = [(1 - p) / NUM_CLASSES] * (NUM_CLASSES + 1)
    row[cls] = p
    return row


def _panoptic_scene():
    """8x8 image, six queries (mask logits +10 inside, -10 outside):

    q0 stuff 1, p .95: columns 0-3          q1 stuff 1, p .93: rows 0-3, columns 4-7 (merges with q0)
    q2 thing 0, p .97: rows 4-7, cols 4-5   q3 thing 0, p .90: rows 4-7, cols 4-7 (loses cols 4-5 to q2: 50 %)
    q4 stuff 2, p .70 (below threshold)     q5 no-object
    """
    masks = torch.full((6, 8, 8), OFF)
    masks[0, :, :4] = ON
    masks[1, :4, 4:] = ON
    masks[2, 4:, 4:6] = ON
    masks[3, 4:, 4:] = ON
    masks[4, :, :] = ON
    masks[5, :, :] = ON
    class_logits = _class_logits(
        [
            _confident(1),
            _confident(1, 0.93),
            _confident(0, 0.97),
            _confident(0, 0.90),
            _confident(2, 0.7),
            _confident(3),
        ]
    )
    return class_logits, masks


def test_panoptic_stuff_merge_overlap_and_threshold_rejection():
    class_logits, masks = _panoptic_scene()
    inference = Mask2FormerInference(NUM_CLASSES, thing_classes=[0])
    panoptic, segments = inference.panoptic(class_logits, masks)
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[:, :4] = 1
    expected[:4, 4:] = 1  # q1 merged into q0's stuff segment
    expected[4:, 4:6] = 2  # q2; q3's remaining columns 6-7 are void (q3 rejected: 8/16 < 0.8)
    assert torch.equal(panoptic, expected)
    assert segments == [
        {"id": 1, "category_id": 1, "isthing": False, "score": pytest.approx(0.95), "area": 48},
        {"id": 2, "category_id": 0, "isthing": True, "score": pytest.approx(0.97), "area": 8},
    ]


def test_panoptic_thresholds_are_configurable():
    class_logits, masks = _panoptic_scene()
    # overlap 0.4 lets q3 in with its 8 visible of 16 pixels.
    inference = Mask2FormerInference(NUM_CLASSES, thing_classes=[0], overlap_threshold=0.4)
    panoptic, segments = inference.panoptic(class_logits, masks)
    assert [(s["id"], s["category_id"], s["area"]) for s in segments] == [(1, 1, 48), (2, 0, 8), (3, 0, 8)]
    assert (panoptic[4:, 6:] == 3).all()

    # object threshold: q4 (stuff 2, p .7) alone claims the corner q3 left void
    masks[4] = OFF
    masks[4, 4:, 6:] = ON
    masks[3, 4:, 6:] = OFF
    strict = Mask2FormerInference(NUM_CLASSES, thing_classes=[0])
    assert 2 not in [s["category_id"] for s in strict.panoptic(class_logits, masks)[1]]  # p .7 <= 0.8
    lenient = Mask2FormerInference(NUM_CLASSES, thing_classes=[0], object_mask_threshold=0.6)
    panoptic, segments = lenient.panoptic(class_logits, masks)
    assert segments[-1]["category_id"] == 2 and segments[-1]["area"] == 8
    assert (panoptic[4:, 6:] == segments[-1]["id"]).all()


def test_things_of_one_class_stay_separate():
    masks = torch.full((2, 4, 4), OFF)
    masks[0, :, :2] = ON
    masks[1, :, 2:] = ON
    class_logits = _class_logits([_confident(0), _confident(0)])
    panoptic, segments = Mask2FormerInference(NUM_CLASSES, thing_classes=[0]).panoptic(class_logits, masks)
    assert [s["id"] for s in segments] == [1, 2] and panoptic.unique().tolist() == [1, 2]
    # the same queries as stuff merge into one segment
    panoptic, segments = Mask2FormerInference(NUM_CLASSES, thing_classes=[]).panoptic(class_logits, masks)
    assert len(segments) == 1 and segments[0]["area"] == 16 and (panoptic == 1).all()


def test_everything_void():
    masks = torch.full((3, 8, 8), ON)
    class_logits = _class_logits([_confident(3)] * 2 + [_confident(1, 0.5)])  # no-object, and one unsure
    panoptic, segments = Mask2FormerInference(NUM_CLASSES).panoptic(class_logits, masks)
    assert segments == [] and panoptic.dtype == torch.long and (panoptic == 0).all()
    # a kept query whose mask is nowhere >= 0.5 gives void too
    class_logits = _class_logits([_confident(1)])
    panoptic, segments = Mask2FormerInference(NUM_CLASSES).panoptic(class_logits, torch.full((1, 8, 8), OFF))
    assert segments == [] and (panoptic == 0).all()


def test_semantic_equals_direct_computation():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 5, NUM_CLASSES + 1), "pred_masks": torch.randn(2, 5, 8, 12)}
    image_sizes, orig_sizes = [(32, 48), (24, 40)], [(32, 48), (30, 50)]
    results = Mask2FormerInference(NUM_CLASSES, instance_on=False, panoptic_on=False)(outputs, image_sizes, orig_sizes)
    for i, result in enumerate(results):
        assert set(result) == {"sem_seg"}
        logits = F.interpolate(outputs["pred_masks"][i : i + 1], size=(32, 48), mode="bilinear", align_corners=False)
        logits = logits[:, :, : image_sizes[i][0], : image_sizes[i][1]]
        logits = F.interpolate(logits, size=orig_sizes[i], mode="bilinear", align_corners=False)[0]
        probs = outputs["pred_logits"][i].softmax(-1)
        direct = torch.zeros(NUM_CLASSES, *orig_sizes[i])
        for q in range(5):
            for c in range(NUM_CLASSES):
                direct[c] += probs[q, c] * logits[q].sigmoid()
        assert torch.allclose(result["sem_seg"], direct, atol=1e-6)


def test_instance_topk_ordering_and_thing_filter():
    # Class probabilities (Q=3, K=3): the 4 best (query, class) pairs are
    # (q0,c0) .6, (q1,c2) .5, (q2,c1) .45, (q0,c1) .3; then only things {0, 2} are kept.
    class_logits = _class_logits([[0.6, 0.3, 0.05, 0.05], [0.1, 0.1, 0.5, 0.3], [0.05, 0.45, 0.2, 0.3]])
    masks = torch.full((3, 4, 4), -3.0)
    masks[0, :2] = 2.0  # mean sigmoid inside = sigmoid(2)
    masks[1, :1, :1] = 4.0
    masks[2, :, :] = 1.0
    instances = Mask2FormerInference(NUM_CLASSES, thing_classes=[0, 2], topk_per_image=4).instance(class_logits, masks)
    s = torch.sigmoid
    expected_scores = [0.6 * s(torch.tensor(2.0)).item(), 0.5 * s(torch.tensor(4.0)).item()]  # .528 > .491
    assert instances["labels"].tolist() == [0, 2]
    assert instances["scores"].tolist() == pytest.approx(expected_scores, abs=1e-6)
    assert instances["masks"].dtype == torch.bool
    assert torch.equal(instances["masks"][0], masks[0] > 0) and torch.equal(instances["masks"][1], masks[1] > 0)

    # without a thing list every class counts; top-2 keeps the two best class scores, then sorts by final score
    all_classes = Mask2FormerInference(NUM_CLASSES, topk_per_image=2).instance(class_logits, masks)
    assert sorted(all_classes["labels"].tolist()) == [0, 2]
    assert all_classes["scores"][0] >= all_classes["scores"][1]
    # k larger than Q*K is capped
    assert len(Mask2FormerInference(NUM_CLASSES, topk_per_image=100).instance(class_logits, masks)["scores"]) == 9


def test_crop_then_resize_on_padded_batch():
    # A 32x48 padded batch (mask cells 8x12); padding logits are -5 for every query, so an uncropped map
    # would leak void or shift the boundaries. Each valid region is split in two halves, one per query.
    # Image 0: valid 16x48 (rows padded), left half query 0 / right half query 1, output 10x16:
    #   columns 0-7 -> segment 1, columns 8-15 -> segment 2, in every row.
    # Image 1: valid 32x24 (columns padded), top half query 0 / bottom half query 1, output 12x10:
    #   rows 0-5 -> segment 1, rows 6-11 -> segment 2, in every column.
    masks = torch.full((2, 2, 8, 12), -5.0)
    masks[0, 0, :4, :6] = 5.0
    masks[0, 1, :4, 6:] = 5.0
    masks[1, 0, :4, :6] = 5.0
    masks[1, 1, 4:, :6] = 5.0
    outputs = {
        "pred_logits": _class_logits([_confident(1), _confident(2)]).expand(2, 2, 4).clone(),
        "pred_masks": masks,
    }
    image_sizes, orig_sizes = [(16, 48), (32, 24)], [(10, 16), (12, 10)]
    results = Mask2FormerInference(NUM_CLASSES, thing_classes=[0])(outputs, image_sizes, orig_sizes)
    expected = [torch.ones(10, 16, dtype=torch.long), torch.ones(12, 10, dtype=torch.long)]
    expected[0][:, 8:] = 2
    expected[1][6:, :] = 2
    for result, expected_map, (h0, w0) in zip(results, expected, orig_sizes):
        panoptic, segments = result["panoptic_seg"]
        assert torch.equal(panoptic, expected_map)
        assert [(s["category_id"], s["area"]) for s in segments] == [(1, h0 * w0 // 2), (2, h0 * w0 // 2)]
        assert result["sem_seg"].shape == (NUM_CLASSES, h0, w0)
        assert result["instances"]["masks"].shape[1:] == (h0, w0)


def test_masks_to_original_size_known_values():
    # Constant logits stay constant through upsample, crop and resize; a crop of exactly the upsampled map
    # at the original size equals the upsampled map itself.
    constant = torch.full((1, 2, 3), 1.5)
    assert torch.allclose(masks_to_original_size(constant, (8, 12), (5, 7), (13, 3)), torch.full((1, 13, 3), 1.5))
    logits = torch.randn(3, 2, 3)
    up = F.interpolate(logits[None], size=(8, 12), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(masks_to_original_size(logits, (8, 12), (6, 9), (6, 9)), up[:, :6, :9])


def test_empty_instances_and_bf16_input():
    outputs = {
        "pred_logits": _class_logits([_confident(1)]).unsqueeze(0).bfloat16(),
        "pred_masks": torch.full((1, 1, 4, 4), OFF).bfloat16(),
    }
    inference = Mask2FormerInference(NUM_CLASSES, thing_classes=[0], topk_per_image=1)
    (result,) = inference(outputs, [(16, 16)], [(7, 9)])
    assert result["instances"]["masks"].shape == (0, 7, 9)  # the single best pair is (query 0, stuff class 1)
    assert result["sem_seg"].dtype == torch.float32
    assert result["panoptic_seg"][1] == []


def test_bad_inputs_raise_value_error():
    outputs = {"pred_logits": torch.zeros(1, 2, NUM_CLASSES + 1), "pred_masks": torch.zeros(1, 2, 4, 4)}
    inference = Mask2FormerInference(NUM_CLASSES)
    with pytest.raises(ValueError, match="image_sizes"):
        inference(outputs, [(17, 16)], [(10, 10)])
    with pytest.raises(ValueError, match="pred_logits"):
        inference({**outputs, "pred_logits": torch.zeros(1, 2, 3)}, [(16, 16)], [(10, 10)])
    with pytest.raises(ValueError, match="orig_sizes"):
        inference(outputs, [(16, 16)], [])
    with pytest.raises(ValueError, match="thing_classes"):
        Mask2FormerInference(NUM_CLASSES, thing_classes=[3])
    assert math.isfinite(inference(outputs, [(16, 16)], [(10, 10)])[0]["sem_seg"].sum().item())
