"""Built-in class lists of the standard datasets (facts of the datasets, as their tools define them).

They give a datamodule its :class:`~proscale.structures.DatasetMeta` before any file is read (the model
needs ``num_classes`` at construction). When the dataset's panoptic JSON is present, its ``categories``
are used instead, so a custom COCO-format dataset works with the same loader.
"""

from __future__ import annotations

from proscale.structures import DatasetMeta

# COCO panoptic (panopticapi's panoptic_coco_categories.json): 80 things (ids <= 90) + 53 stuff.
_COCO_PANOPTIC = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
    (92, "banner"), (93, "blanket"), (95, "bridge"), (100, "cardboard"), (107, "counter"), (109, "curtain"),
    (112, "door-stuff"), (118, "floor-wood"), (119, "flower"), (122, "fruit"), (125, "gravel"), (128, "house"),
    (130, "light"), (133, "mirror-stuff"), (138, "net"), (141, "pillow"), (144, "platform"),
    (145, "playingfield"), (147, "railroad"), (148, "river"), (149, "road"), (151, "roof"), (154, "sand"),
    (155, "sea"), (156, "shelf"), (159, "snow"), (161, "stairs"), (166, "tent"), (168, "towel"),
    (171, "wall-brick"), (175, "wall-stone"), (176, "wall-tile"), (177, "wall-wood"), (178, "water-other"),
    (180, "window-blind"), (181, "window-other"), (184, "tree-merged"), (185, "fence-merged"),
    (186, "ceiling-merged"), (187, "sky-other-merged"), (188, "cabinet-merged"), (189, "table-merged"),
    (190, "floor-other-merged"), (191, "pavement-merged"), (192, "mountain-merged"), (193, "grass-merged"),
    (194, "dirt-merged"), (195, "paper-merged"), (196, "food-other-merged"), (197, "building-other-merged"),
    (198, "rock-merged"), (199, "wall-other-merged"), (200, "rug-merged"),
]  # fmt: skip

# Cityscapes: the 19 evaluated classes (label id, name) in trainId order; label ids >= 24 are things.
_CITYSCAPES = [
    (7, "road"), (8, "sidewalk"), (11, "building"), (12, "wall"), (13, "fence"), (17, "pole"),
    (19, "traffic light"), (20, "traffic sign"), (21, "vegetation"), (22, "terrain"), (23, "sky"),
    (24, "person"), (25, "rider"), (26, "car"), (27, "truck"), (28, "bus"), (31, "train"), (32, "motorcycle"),
    (33, "bicycle"),
]  # fmt: skip

# ADE20K SceneParsing 150 classes (objectInfo150 order; raw PNG value = index + 1, 0 = "other").
_ADE20K = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road, route", "bed", "window ", "grass", "cabinet",
    "sidewalk, pavement", "person", "earth, ground", "door", "table", "mountain, mount", "plant", "curtain",
    "chair", "car", "water", "painting, picture", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock, stone", "wardrobe, closet, press", "lamp", "tub", "rail",
    "cushion", "base, pedestal, stand", "box", "column, pillar", "signboard, sign",
    "chest of drawers, chest, bureau, dresser", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator, icebox", "grandstand, covered stand", "path", "stairs", "runway",
    "case, display case, showcase, vitrine", "pool table, billiard table, snooker table", "pillow",
    "screen door, screen", "stairway, staircase", "river", "bridge, span", "bookcase", "blind, screen",
    "coffee table", "toilet, can, commode, crapper, pot, potty, stool, throne", "flower", "book", "hill",
    "bench", "countertop", "stove", "palm, palm tree", "kitchen island", "computer", "swivel chair", "boat",
    "bar", "arcade machine", "hovel, hut, hutch, shack, shanty", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning, sunshade, sunblind", "street lamp", "booth", "tv", "plane", "dirt track", "clothes",
    "pole", "land, ground, soil", "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway", "ottoman, pouf, pouffe, puff, hassock", "bottle",
    "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card", "stage", "van", "ship",
    "fountain", "conveyer belt, conveyor belt, conveyer, conveyor, transporter", "canopy",
    "washer, automatic washer, washing machine", "plaything, toy", "pool", "stool", "barrel, cask",
    "basket, handbasket", "falls", "tent", "bag", "minibike, motorbike", "cradle", "oven", "ball",
    "food, solid food", "step, stair", "tank, storage tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket, cover", "sculpture", "hood, exhaust hood", "sconce",
    "vase", "traffic light", "tray", "trash can", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass, drinking glass", "clock", "flag",
]  # fmt: skip

# ADE20K panoptic conversion (Mask2Former's prepare_ade20k_pan_seg.py): the 100 classes with instances.
_ADE20K_THING_IDS = {
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43, 44, 45, 47,
    49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82, 83, 85, 86,
    87, 88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118, 119, 120, 121,
    123, 124, 125, 126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
}  # fmt: skip


def coco_panoptic_meta() -> DatasetMeta:
    """133 COCO panoptic classes (80 things, 53 stuff), contiguous in category-id order."""
    return DatasetMeta(
        class_names=[name for _, name in _COCO_PANOPTIC],
        category_ids=[cid for cid, _ in _COCO_PANOPTIC],
        isthing=[cid < 92 for cid, _ in _COCO_PANOPTIC],
    )


def coco_instance_meta() -> DatasetMeta:
    """80 COCO instance classes (the things of the panoptic list, same ids)."""
    things = [(cid, name) for cid, name in _COCO_PANOPTIC if cid < 92]
    return DatasetMeta([n for _, n in things], [c for c, _ in things], [True] * len(things))


def cityscapes_meta() -> DatasetMeta:
    """19 Cityscapes classes (8 things), contiguous index = trainId, category id = Cityscapes label id."""
    return DatasetMeta([n for _, n in _CITYSCAPES], [c for c, _ in _CITYSCAPES], [c >= 24 for c, _ in _CITYSCAPES])


def ade20k_meta() -> DatasetMeta:
    """150 ADE20K classes; category id = contiguous index (the panoptic conversion's ids); 100 things."""
    return DatasetMeta(list(_ADE20K), list(range(150)), [i in _ADE20K_THING_IDS for i in range(150)])


BUILTIN_METAS = {
    "coco_panoptic": coco_panoptic_meta,
    "coco_instance": coco_instance_meta,
    "cityscapes": cityscapes_meta,
    "ade20k": ade20k_meta,
}


def builtin_meta(name: str) -> DatasetMeta:
    if name not in BUILTIN_METAS:
        raise ValueError(f"unknown built-in dataset meta {name!r}; valid choices: {sorted(BUILTIN_METAS)}")
    return BUILTIN_METAS[name]()


def meta_from_categories(categories: list[dict], source: str) -> DatasetMeta:
    """COCO ``categories`` (id, name, isthing optional = 1) -> DatasetMeta sorted by category id."""
    if not categories:
        raise ValueError(f"{source}: the JSON has no 'categories'")
    try:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return DatasetMeta(
            class_names=[str(c.get("name", c["id"])) for c in cats],
            category_ids=[int(c["id"]) for c in cats],
            isthing=[bool(c.get("isthing", 1)) for c in cats],
            colors=[tuple(c["color"]) for c in cats] if all("color" in c for c in cats) else [],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{source}: malformed 'categories': {error}") from error
