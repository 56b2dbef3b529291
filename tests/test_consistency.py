"""One checkpoint gives one result everywhere (issue 14) and prediction keeps going past bad images (issue 15).

A short synthetic run with EMA on (easy data: 32x32 images, one object on one background region, so 16 steps
score PQ > 0) is scored three ways that must agree: the run's own test, ``eval`` from the checkpoint, and
``predict`` on the validation images + the offline scorer ``scripts/score_coco.py``. The run is scored with
``object_mask_threshold=0.1``, which eval and predict must take from the checkpoint (their configured defaults
are 0.8 and would find nothing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from proscale.data.image_io import read_panoptic_png
from proscale.lightning.module import SegmentationModule
from proscale.models.inference import Mask2FormerInference
from proscale.tasks.eval import evaluate
from proscale.tasks.predict import EXIT_SOME_FAILED, predict
from proscale.tasks.train import train
from proscale.utils.hydra_utils import compose_config
from proscale.utils.results import read_results
from proscale.utils.safe_load import torch_load
from proscale.weights import read_weights

EASY_DATA = [
    "data.height=32",
    "data.width=32",
    "data.num_train=16",
    "data.min_objects=1",
    "data.max_objects=1",
    "data.max_stuff_regions=1",
    # the generator as before 2026-12-03 (this tiny run scores PQ > 0 on it): the default 24 px objects do not fit
    # a 32 px image
    "data.min_object_size=8",
    "data.max_object_fraction=0.5",
    "data.thing_fills=[solid,gradient,stripes]",
]
RUN = [
    "experiment=tiny",
    "num_threads=1",
    "trainer.enable_progress_bar=false",
    "extras.print_config=false",
    "callbacks.compute_stats=null",
    *EASY_DATA,
]


def _scorer():
    from proscale.tasks import score_coco

    return score_coco


@pytest.fixture(scope="module")
def easy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    cfg = compose_config(
        "train",
        [
            *RUN,
            f"paths.data_dir={root / 'data'}",
            f"paths.log_dir={root / 'logs'}",
            "steps=16",
            "module.optimizer.lr=2e-3",
            "module.ema_decay=0.9",
            "module.inference.object_mask_threshold=0.1",
            "trainer.check_val_every_n_epoch=null",
            "trainer.val_check_interval=${steps}",
        ],
        output_dir=root / "train",
    )
    metrics, _ = train(cfg)
    results = read_results(root / "train")
    data = root / "data" / "synthetic_tiny"
    return {"root": root, "metrics": metrics, "best": results["best_checkpoint"], "data": data}


def test_checkpoint_stores_what_produced_its_scores(easy_run):
    checkpoint = torch_load(easy_run["best"])  # plain types only: the safe loader reads it
    hparams = checkpoint["hyper_parameters"]
    assert hparams["inference"] == {
        "object_mask_threshold": 0.1,
        "overlap_threshold": 0.8,
        "topk_per_image": 16,
        "semantic_on": True,
        "instance_on": True,
        "panoptic_on": True,
    }
    assert hparams["test_transforms"] == []  # data/synthetic.yaml: native size
    assert hparams["ema_decay"] == 0.9 and hparams["meta"]["class_names"][0] == "circle"
    ema, raw = read_weights(easy_run["best"]), read_weights(easy_run["best"], use_ema=False)
    assert ema.ema and not raw.ema and ema.inference == hparams["inference"]
    name = "transformer_decoder.class_embed.weight"
    assert not torch.equal(ema.state_dict[name], raw.state_dict[name])


def test_eval_predict_and_the_offline_scorer_agree(easy_run, tmp_path, monkeypatch):
    run_pq = easy_run["metrics"]["test/PQ"]
    assert run_pq > 0, "the run scores PQ 0: agreeing on 0 would prove nothing"

    # eval from the checkpoint, recording the panoptic map it computes per image
    names, maps = [], []
    real_step, real_inference = SegmentationModule._eval_step, Mask2FormerInference.forward

    def recording_step(self, batch, stage):
        names.extend(batch["file_names"])
        return real_step(self, batch, stage)

    def recording_inference(self, outputs, image_sizes, orig_sizes):
        results = real_inference(self, outputs, image_sizes, orig_sizes)
        maps.extend(r["panoptic_seg"][0].cpu().numpy() for r in results)
        return results

    monkeypatch.setattr(SegmentationModule, "_eval_step", recording_step)
    monkeypatch.setattr(Mask2FormerInference, "forward", recording_inference)
    root = easy_run["root"]
    common = [f"paths.data_dir={root / 'data'}", f"paths.log_dir={root / 'logs'}"]
    cfg = compose_config("eval", [*RUN, *common, f"ckpt_path={easy_run['best']}"], output_dir=tmp_path / "eval")
    eval_metrics, _ = evaluate(cfg)
    monkeypatch.undo()
    assert eval_metrics["test/PQ"] == pytest.approx(run_pq, abs=0.01)
    assert eval_metrics["test/AP"] == pytest.approx(easy_run["metrics"]["test/AP"], abs=0.01)
    eval_maps = dict(zip(names, maps))

    # predict on the validation images (ids from the GT file), then score its files offline
    data = easy_run["data"]
    gt_json = data / "annotations" / "panoptic_val.json"
    out = tmp_path / "pred"
    cfg = compose_config(
        "predict",
        [
            f"weights={easy_run['best']}",
            f"input={data / 'val'}",
            f"gt_json={gt_json}",
            f"output_dir={out}",
            "device=cpu",  # as the tiny preset's trainer: bit-equal maps need the same device
            *common,
        ],
        output_dir=tmp_path / "predict",
    )
    summary, _ = predict(cfg)
    assert summary == {**summary, "images": 4, "succeeded": 4, "failed": 0}
    scorer = _scorer()
    args = [
        "--gt-json",
        str(gt_json),
        "--gt-dir",
        str(data / "panoptic_val"),
        "--pred-json",
        str(out / "panoptic.json"),
    ]
    assert (
        scorer.main(
            ["--task", "panoptic", *args, "--pred-dir", str(out / "panoptic"), "--out", str(tmp_path / "pq.json")]
        )
        == 0
    )
    offline = json.loads((tmp_path / "pq.json").read_text())
    assert offline["PQ"] == pytest.approx(eval_metrics["test/PQ"], abs=0.01)
    assert offline["PQ"] == pytest.approx(run_pq, abs=0.01)
    instance_args = ["--pred-json", str(out / "instances.json"), "--gt-dir", str(data / "panoptic_val")]
    assert (
        scorer.main(
            ["--task", "instance", "--gt-json", str(gt_json), *instance_args, "--out", str(tmp_path / "ap.json")]
        )
        == 0
    )
    assert json.loads((tmp_path / "ap.json").read_text())["AP"] == pytest.approx(eval_metrics["test/AP"], abs=0.01)

    # the PNG predict wrote for each image is the panoptic map eval computed for it
    assert sorted(eval_maps) == [f"{i:06d}.jpg" for i in range(1, 5)]
    for name, eval_map in eval_maps.items():
        predicted = read_panoptic_png(out / "panoptic" / name.replace(".jpg", ".png"))
        np.testing.assert_array_equal(predicted, eval_map)
    assert any(len(np.unique(m)) > 1 or m.max() > 0 for m in eval_maps.values())  # not all void
    # semantic PNGs: class indices at the image size; overlays: the image enlarged + a legend panel
    semantic = np.asarray(Image.open(out / "semantic" / "000001.png"))
    assert semantic.shape == (32, 32) and semantic.max() < 10
    overlay = np.asarray(Image.open(out / "overlays" / "000001.png"))
    assert overlay.shape[0] == 320 and overlay.shape[1] > 320


def test_bad_images_are_skipped_listed_and_the_rest_is_written(easy_run, tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    val = easy_run["data"] / "val"
    Image.open(val / "000001.jpg").save(images / "a_good.png")
    Image.open(val / "000002.jpg").resize((48, 40)).save(images / "d_good.jpg")
    Image.new("RGB", (10, 40000), (90, 120, 30)).save(images / "b_tall.png")  # 40000 x 10: resizes to 0 px
    whole = (val / "000003.jpg").read_bytes()
    (images / "c_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "pred"
    overrides = [
        f"ckpt_path={easy_run['best']}",  # the alias
        f"input_dir={images}",  # the alias
        f"output_dir={out}",
        "short_side=32",  # (the 40000 x 10 image would fit the native-size transform)
        "batch_size=2",  # a failing batch is retried image by image
        "num_threads=1",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    cfg = compose_config("predict", overrides, output_dir=tmp_path / "run")
    thread_counts = []
    monkeypatch.setattr(torch, "set_num_threads", thread_counts.append)
    summary, objects = predict(cfg)
    monkeypatch.undo()
    assert thread_counts == [1]  # num_threads works in predict
    assert (summary["images"], summary["succeeded"], summary["failed"]) == (4, 2, 2)
    listed = json.loads((out / "summary.json").read_text())
    assert [Path(f["file"]).name for f in listed["failed"]] == ["b_tall.png", "c_truncated.jpg"]
    assert "c_truncated.jpg" in listed["failed"][1]["error"] and "truncated" in listed["failed"][1]["error"]
    panoptic = json.loads((out / "panoptic.json").read_text())
    assert [a["file_name"] for a in panoptic["annotations"]] == ["a_good.png", "d_good.png"]
    assert [(i["id"], i["file_name"]) for i in panoptic["images"]] == [(1, "a_good.png"), (4, "d_good.jpg")]
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["a_good.png", "d_good.png"]
    assert read_panoptic_png(out / "panoptic" / "d_good.png").shape == (40, 48)
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries
    instances = json.loads((out / "instances.json").read_text())
    assert all(set(r) == {"image_id", "category_id", "segmentation", "score"} for r in instances)
    assert {r["image_id"] for r in instances} <= {1, 4}

    # the console script's exit status says that some images failed
    from proscale import cli

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "predict",
            *overrides[:2],
            f"output_dir={tmp_path / 'cli'}",
            *overrides[3:],
            f"hydra.run.dir={tmp_path / 'cli_run'}",
            "extras.print_config=false",
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.predict_main()
    assert exit_info.value.code == EXIT_SOME_FAILED
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["succeeded"] == 2


def test_predict_refuses_unknown_names_and_stored_classes_must_match_the_dataset(easy_run, tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 7, "file_name": "other.jpg"}]}))
    cfg = compose_config(
        "predict",
        [
            f"weights={easy_run['best']}",
            f"input={easy_run['data'] / 'val' / '000001.jpg'}",
            f"gt_json={gt}",
            f"output_dir={tmp_path / 'pred'}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        output_dir=tmp_path / "run",
    )
    with pytest.raises(ValueError, match=r"lists no image named \['000001.jpg'\]"):
        predict(cfg)
    assert not (tmp_path / "pred").exists()
    # eval on a dataset with other classes: the tiny run's 10 classes vs a renamed one
    from proscale.structures import DatasetMeta
    from proscale.tasks.stored_run import check_meta_matches

    loaded = read_weights(easy_run["best"])
    other = DatasetMeta(**{**loaded.meta, "class_names": ["disc", *loaded.meta["class_names"][1:]]})
    with pytest.raises(ValueError, match=r"other classes than this dataset's: class_names differ .*'circle' vs 'disc'"):
        check_meta_matches(loaded, other)


def test_stored_settings_replace_the_configured_ones_unless_given_on_the_command_line(tmp_path, capsys):
    """No training: a hand-made LoadedWeights and eval's composed config."""
    from proscale.tasks.eval import apply_stored_settings
    from proscale.weights import LoadedWeights

    stored_model = {"_target_": "proscale.models.Mask2Former", "num_classes": 10, "dec_layers": 2, "hidden_dim": 32}
    loaded = LoadedWeights(
        path=tmp_path / "run.ckpt",
        format="lightning",
        state_dict={},
        model_config=stored_model,
        inference={"object_mask_threshold": 0.1, "overlap_threshold": 0.6, "topk_per_image": 5},
        test_transforms=[{"_target_": "proscale.data.transforms.ResizeShortestEdge", "short_edge": 48}],
    )
    given = ["model.dec_layers=3", "module.inference.overlap_threshold=0.7", "module.ema_decay=0.99"]
    cfg = compose_config("eval", ["experiment=tiny", *given], output_dir=tmp_path / "eval")
    apply_stored_settings(cfg, loaded)
    printed = capsys.readouterr().out
    assert cfg.model == {**stored_model, "dec_layers": 3}  # the stored config, the command line's key on top
    assert "model.dec_layers=3 (command line) instead of 2 stored in" in printed
    inference = cfg.module.inference
    assert (inference.object_mask_threshold, inference.overlap_threshold, inference.topk_per_image) == (0.1, 0.7, 5)
    assert "module.inference.overlap_threshold: 0.7 (command line; the weights store 0.6)" in printed
    assert cfg.data.test_transforms == loaded.test_transforms
    assert cfg.module.ema_decay is None  # the chosen weights (EMA or raw) are loaded into the model itself

    cfg = compose_config("eval", ["experiment=tiny", "data.test_transforms=[]"], output_dir=tmp_path / "eval2")
    apply_stored_settings(cfg, loaded)
    assert cfg.data.test_transforms == [] and "data.test_transforms: command line" in capsys.readouterr().out


def test_predict_through_onnx_runtime_equals_pytorch(easy_run, tmp_path):
    """`predict onnx=FILE` (an export of the run's checkpoint) writes the same panoptic maps and segments as
    `predict weights=` on the run's validation images: the deployed model predicts as the PyTorch one."""
    pytest.importorskip("onnxruntime", reason="the deploy extra is part of the dev install")
    from proscale.export.task import export

    root, data = easy_run["root"], easy_run["data"]
    common = [f"paths.data_dir={root / 'data'}", f"paths.log_dir={root / 'logs'}", "device=cpu", "num_threads=1"]
    onnx_file = tmp_path / "run.onnx"  # fixed size: the 32x32 images are resized to it (short_side=64 below)
    cfg = compose_config(
        "export",
        [f"weights={easy_run['best']}", f"output={onnx_file}", "image_size=[64,64]", *common[:2], "num_threads=1"],
        output_dir=tmp_path / "export",
    )
    export(cfg)
    outputs = {}
    for name, source in (("torch", f"weights={easy_run['best']}"), ("onnx", f"onnx={onnx_file}")):
        out = tmp_path / name
        cfg = compose_config(
            "predict",
            [source, f"input={data / 'val'}", f"output_dir={out}", *common],
            output_dir=tmp_path / f"p_{name}",
        )
        summary, _ = predict(cfg)
        assert summary["succeeded"] == 4 and summary["failed"] == 0
        outputs[name] = out
    torch_json = json.loads((outputs["torch"] / "panoptic.json").read_text())
    onnx_json = json.loads((outputs["onnx"] / "panoptic.json").read_text())
    assert onnx_json["annotations"] == torch_json["annotations"]
    assert sum(len(a["segments_info"]) for a in torch_json["annotations"]) > 0  # something was found
    for png in sorted((outputs["torch"] / "panoptic").glob("*.png")):
        np.testing.assert_array_equal(
            read_panoptic_png(outputs["onnx"] / "panoptic" / png.name), read_panoptic_png(png)
        )
