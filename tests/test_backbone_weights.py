"""ImageNet backbone files as users have them (``model.backbone.pretrained``): each layout is written exactly as
its source writes it, from a source model with random weights, loaded by content, and the loaded backbone's
features must equal the source architecture's within 1e-4 relative. Also: refused and broken files, ``true``
offline, ``none``, and the presets that refuse to start without weights."""

from __future__ import annotations

import pickle
import re
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from proscale.cli import CONFIG_DIR
from proscale.models.backbone_weights import (
    FROM_FILE,
    FROM_HUB,
    FROM_SCRATCH,
    NOT_SET,
    pretrained_choice,
    require_backbone_weights,
)
from proscale.models.backbones import FEATURE_NAMES, build_backbone
from proscale.utils.hydra_utils import compose_config
from proscale.utils.safe_load import UnsafeFileError

RESNET_INPUT = (1, 3, 64, 64)
# Swin: 224 = 7 * 32 makes every stage a whole number of 7x7 windows, where the original's pad-then-shift and
# timm's shift-then-pad agree (test_backbones.py checks the padded case separately)
SWIN_INPUT = (1, 3, 224, 224)
PRESETS_NEEDING_WEIGHTS = sorted(
    p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml") if p.stem.startswith(("coco_", "ade20k_", "city"))
)


def randomize_constants_(model: torch.nn.Module) -> torch.nn.Module:
    """Give every constant-initialised tensor (norm weights / biases, BN statistics, zero biases) random values, so
    a wrongly mapped norm or statistic changes the features."""
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point() and tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all()):
                tensor.add_(0.2 * torch.randn_like(tensor))
                if name.endswith("running_var"):
                    tensor.abs_().add_(0.1)
    return model.eval()


def resnet_stage_features(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """layer1..layer4 outputs of a torchvision or timm ResNet (the same module names, but the activation's)."""
    relu = getattr(model, "relu", None) or model.act1
    x = model.maxpool(relu(model.bn1(model.conv1(images))))
    out = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        out.append(x)
    return out


def assert_features_equal(backbone: torch.nn.Module, expected: list[torch.Tensor], images: torch.Tensor) -> None:
    with torch.no_grad():
        actual = backbone.eval()(images)
    for name, reference in zip(FEATURE_NAMES, expected):
        assert actual[name].shape == reference.shape, name
        relative = ((actual[name] - reference).abs().max() / reference.abs().max()).item()
        assert relative <= 1e-4, f"{name}: max difference {relative:.2e} of the largest value"


def torchvision_to_detectron2(name: str) -> str:
    """detectron2's tools/convert-torchvision-to-d2.py renames, applied in order (the reference's description)."""
    if "layer" not in name:
        name = "stem." + name
    for t in (1, 2, 3, 4):
        name = name.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        name = name.replace(f"bn{t}", f"conv{t}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


@pytest.fixture(scope="module")
def torchvision_r50():
    torch.manual_seed(1)
    model = randomize_constants_(torchvision.models.resnet50(weights=None))
    images = torch.randn(RESNET_INPUT)
    with torch.no_grad():
        return model, images, resnet_stage_features(model, images)


def test_detectron2_pkl_from_torchvision(tmp_path, torchvision_r50):
    """The torchvision-converted R-50.pkl Mask2Former starts from, loaded into the COCO presets' FrozenBN R50."""
    model, images, expected = torchvision_r50
    converted = {torchvision_to_detectron2(k): v.numpy() for k, v in model.state_dict().items()}
    assert "stem.conv1.norm.running_var" in converted and "res3.0.shortcut.norm.weight" in converted
    path = tmp_path / "R-50.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": converted, "__author__": "torchvision", "matching_heuristics": True}, f)
    backbone = build_backbone("r50", pretrained=str(path), freeze_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert_features_equal(backbone, expected, images)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torchvision_pth(tmp_path, torchvision_r50, zip_format):
    model, images, expected = torchvision_r50
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    assert_features_equal(build_backbone("r50", pretrained=str(path)), expected, images)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_files(tmp_path, suffix):
    torch.manual_seed(2)
    model = randomize_constants_(timm.create_model("resnet50", pretrained=False))
    images = torch.randn(RESNET_INPUT)
    with torch.no_grad():
        expected = resnet_stage_features(model, images)
    path = tmp_path / f"resnet50.a1_in1k{suffix}"
    (save_file if suffix == ".safetensors" else torch.save)(model.state_dict(), path)
    assert_features_equal(build_backbone("r50", pretrained=str(path)), expected, images)


def official_swin_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm Swin-T state dict in the layout of the official swin_tiny_patch4_window7_224.pth: patch merging at the
    end of stage S (timm: start of S+1), ``head.*`` (timm: ``head.fc.*``), plus the buffers the original saves
    (``relative_position_index`` per block, ``attn_mask`` of the shifted blocks of stages 0-2 at 224x224)."""
    state = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        state[key.replace("head.fc.", "head.")] = value
    original_224 = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)  # its buffers only
    persistent = original_224.state_dict()
    state.update({k: v for k, v in original_224.named_buffers() if k not in persistent})
    return state


def test_official_swin_t_pth(tmp_path):
    """Source: timm's Swin-T with the windowing Mask2Former's D2SwinTransformer uses (windows always partitioned,
    so the 7x7 last stage is shifted too); reference features = its stage outputs with the backbone's fresh
    per-level LayerNorms (weight 1, bias 0)."""
    torch.manual_seed(3)
    kwargs = {"strict_img_size": False, "always_partition": True}
    model = randomize_constants_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs))
    state = official_swin_layout(model)
    assert "layers.0.downsample.reduction.weight" in state and "layers.3.downsample.norm.weight" not in state
    assert state["layers.0.blocks.1.attn_mask"].shape == (64, 49, 49) and "head.weight" in state
    assert "layers.2.blocks.0.attn.relative_position_index" in state
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": state}, path)

    images = torch.randn(SWIN_INPUT)
    with torch.no_grad():
        x = model.patch_embed(images)
        expected = []
        for stage in model.layers:
            x = stage(x)
            expected.append(F.layer_norm(x, x.shape[-1:]).permute(0, 3, 1, 2))
    assert_features_equal(build_backbone("swin_t", pretrained=str(path)), expected, images)


@pytest.mark.parametrize("protocol", [0, 2])
def test_caffe2_pkl_is_refused(tmp_path, protocol):
    arrays = {
        "conv1_w": np.zeros((64, 3, 7, 7), np.float32),
        "res_conv1_bn_s": np.ones(64, np.float32),
        "res_conv1_bn_b": np.zeros(64, np.float32),
        "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32),
    }
    path = tmp_path / "R-50.pkl"
    # the MSRA file as detectron2 reads it: caffe2 blob names under "blobs" (with non-array entries besides)
    path.write_bytes(pickle.dumps({"blobs": {**arrays, "lr": 0.1}}, protocol=protocol))
    with pytest.raises(ValueError, match=r"caffe2.*BGR.*torchvision/R-50\.pkl") as error:
        build_backbone("r50", pretrained=str(path))
    assert str(path) in str(error.value)


def test_detectron2_file_that_does_not_fit_names_file_and_keys(tmp_path, torchvision_r50):
    state = {torchvision_to_detectron2(k): v.numpy() for k, v in torchvision_r50[0].state_dict().items()}
    del state["res4.2.conv2.norm.weight"]
    state["res5.9.conv1.weight"] = np.zeros(3, np.float32)
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"model": state, "__author__": "torchvision"}))
    with pytest.raises(ValueError) as error:
        build_backbone("r50", pretrained=str(path))
    message = str(error.value)
    assert str(path) in message and "layer3.2.bn2.weight" in message and "layer4.9.conv1.weight" in message


@pytest.mark.parametrize("kind", ["truncated_pkl", "truncated_zip", "garbage", "empty"])
def test_corrupt_file_names_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated_pkl":
        blob = pickle.dumps({"model": {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}})
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "truncated_zip":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(b"" if kind == "empty" else b"this is not a weight file\n" * 10)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        build_backbone("r50", pretrained=str(path))


class _Payload:
    """Unpickling this creates the marker file: what a malicious weight file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_payload_pickle_is_refused(tmp_path, suffix):
    marker = tmp_path / "payload_ran"
    state = {"conv1.weight": np.zeros(3, np.float32), "bn1.weight": _Payload(marker)}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps({"model": state}))
    else:
        torch.save({"model": state}, path)
    with pytest.raises(UnsafeFileError, match=re.escape(str(path))):
        build_backbone("r50", pretrained=str(path))
    assert not marker.exists()


def test_pretrained_true_offline_fails_at_once_naming_the_option(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import: set it as the apps' start-up does
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        build_backbone("r50", pretrained=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"took {elapsed:.1f} s"  # a 100 MB download would take longer; offline is immediate
    message = str(error.value)
    assert "model.backbone.pretrained=true" in message and "model.backbone.pretrained=/path/to/file" in message
    assert "HF_HUB_OFFLINE" in message and "resnet50" in message


def test_pretrained_true_loads_through_timms_own_hub_loading(monkeypatch):
    """The download itself is replaced (no network in tests); everything after it is timm's own loading."""
    import timm.models._builder as timm_builder

    torch.manual_seed(4)
    source = randomize_constants_(timm.create_model("resnet18", pretrained=False))
    requested = []

    def fake_hub_fetch(repo, *args, **kwargs):
        requested.append(repo)
        return {k: v.clone() for k, v in source.state_dict().items()}

    monkeypatch.setattr(timm_builder, "load_state_dict_from_hf", fake_hub_fetch)
    images = torch.randn(RESNET_INPUT)
    with torch.no_grad():
        expected = resnet_stage_features(source, images)
    assert_features_equal(build_backbone("timm", model_name="resnet18", pretrained=True), expected, images)
    assert requested and str(requested[0]).startswith("timm/resnet18")


@pytest.mark.parametrize(
    ("value", "choice"),
    [
        (None, NOT_SET),
        ("", NOT_SET),
        ("none", FROM_SCRATCH),
        ("None", FROM_SCRATCH),
        ("NONE", FROM_SCRATCH),
        (False, FROM_SCRATCH),
        (True, FROM_HUB),
        ("true", FROM_HUB),
        ("/w/R-50.pkl", FROM_FILE),
        ("none.pth", FROM_FILE),
    ],
)
def test_pretrained_values(value, choice):
    assert pretrained_choice(value) == choice


def test_pretrained_none_builds_random_weights_without_reading_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a file called "none" here must not be read
    Path("none").write_bytes(b"garbage")
    torch.manual_seed(0)
    a = build_backbone("timm", model_name="resnet18", pretrained="None")
    torch.manual_seed(0)
    b = build_backbone("timm", model_name="resnet18", pretrained=None)
    assert torch.equal(a.body.conv1.weight, b.body.conv1.weight)


def test_frozen_batchnorm_from_scratch_warns(caplog):
    with caplog.at_level("WARNING", logger="proscale.models.backbones"):
        build_backbone("timm", model_name="resnet18", pretrained="none", freeze_bn=True)
    assert "freeze_bn=false" in caplog.text


def _compose(experiment: str, tmp_path: Path, *overrides: str):
    return compose_config(
        "train", [f"experiment={experiment}", f"paths.data_dir={tmp_path / 'no_data'}", *overrides], output_dir=tmp_path
    )


@pytest.mark.parametrize("experiment", PRESETS_NEEDING_WEIGHTS)
def test_presets_refuse_to_start_without_backbone_weights(experiment, tmp_path):
    cfg = _compose(experiment, tmp_path)
    with pytest.raises(ValueError) as error:
        require_backbone_weights(cfg)
    message = str(error.value)
    assert f"experiment {experiment!r}" in message
    assert "model.backbone.pretrained=/path/to/file" in message and "model.backbone.pretrained=none" in message
    expected_source = "swin_tiny_patch4_window7_224.pth" if "swin" in experiment else "torchvision/R-50.pkl"
    assert expected_source in message


@pytest.mark.parametrize(
    "given",
    [
        "model.backbone.pretrained=None",
        "model.backbone.pretrained=/w/R-50.pkl",
        "model.backbone.pretrained=true",
        "pretrain=semantic",
        "ckpt_path=/w/last.ckpt",
    ],
)
def test_presets_start_when_weights_are_given_or_declined(given, tmp_path):
    require_backbone_weights(_compose("coco_swin_t_proscale", tmp_path, given))


@pytest.mark.parametrize("experiment", ["cpu_synthetic", "cpu_ablation", "tiny"])
def test_cpu_presets_start_as_before(experiment, tmp_path):
    cfg = _compose(experiment, tmp_path)
    assert not cfg.require_backbone_weights
    require_backbone_weights(cfg)


def test_train_refuses_before_reading_any_data(tmp_path):
    """The data folder does not exist: the refusal must come first, not a missing-data error."""
    from proscale.tasks.train import train

    cfg = _compose("coco_r50_proscale", tmp_path, "trainer=cpu", "num_threads=1")
    with pytest.raises(ValueError, match="model.backbone.pretrained=none"):
        train(cfg)
    assert not (tmp_path / "no_data").exists()


def test_timm_stem_names_are_not_mistaken_for_detectron2(tmp_path):
    """timm RegNets name their stem `stem.conv` / `stem.bn` (the main job's regnetx_002): a file of those names is
    timm's layout, not detectron2's (whose ResNets have res2..res5 blocks); it used to be renamed and refused."""
    import timm

    from proscale.models.backbone_weights import read_backbone_state_dict

    source = timm.create_model("regnetx_002", pretrained=False)
    path = tmp_path / "regnetx_002.pt"
    torch.save(source.state_dict(), path)
    state, layout = read_backbone_state_dict(path)
    assert layout == "torch" and "stem.conv.weight" in state
