"""Weight conversion: detectron2 (.pkl of numpy arrays) and HF (.safetensors) files through
``scripts/convert_weights.py`` load strictly into our model; bad checkpoints fail naming keys / files."""

from __future__ import annotations

import importlib.util
import pickle
import re
from pathlib import Path

import pytest
import torch
from helpers.detectron2_names import TO_DETECTRON2
from helpers.small_models import SMALL_SWIN
from safetensors.torch import save_file

from proscale.convert import detectron2_to_proscale, hf_to_proscale, load_into, read_state_dict
from proscale.convert.io import write_state_dict
from proscale.models import Mask2Former, build_backbone
from proscale.models.encoders import M2FEncoder

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_weights.py"
BACKBONES = {"resnet": dict(model_name="resnet26"), "swin": {**SMALL_SWIN, "output_norms": True}}

def tiny_model(backbone: str, lpe: bool = False, seed: int = 0, num_classes: int = 3) -> Mask2Former:
    torch.manual_seed(seed)
    return Mask2Former(
        build_backbone("timm", **BACKBONES[backbone]),
        M2FEncoder(d_model=32, num_layers=2, n_heads=4, dim_feedforward=64),
        num_classes=num_classes, conv_dim=32, mask_dim=32, lpe=lpe, num_queries=4, hidden_dim=32, dim_feedforward=64, nheads=4,
    )  # fmt: skip


def to_detectron2(model: Mask2Former) -> dict:
    """A model-zoo style state dict: numpy arrays, FrozenBN (no step counter), the buffers d2 saves."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, replacement in TO_DETECTRON2:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value.numpy().copy()
    out["pixel_mean"], out["pixel_std"] = torch.zeros(3, 1, 1).numpy(), torch.ones(3, 1, 1).numpy()
    out["criterion.empty_weight"] = torch.ones(4).numpy()
    for key in list(out):
        if key.endswith("attn.relative_position_bias_table"):
            out[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(49, 49).numpy()
    return out


def run_script(*args: str) -> int:
    """Run ``scripts/convert_weights.py``'s ``main`` in this process (a subprocess would re-import torch)."""
    spec = importlib.util.spec_from_file_location("convert_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


@pytest.mark.parametrize("backbone, lpe", [("resnet", False), ("swin", False), ("resnet", True)])
def test_detectron2_pickle_round_trip(tmp_path, backbone, lpe):
    source = tiny_model(backbone, lpe=lpe, seed=0).eval()
    d2 = to_detectron2(source)
    if lpe:
        assert "sem_seg_head.pixel_decoder.layer_1.norm.weight" in d2
        assert "sem_seg_head.pixel_decoder.layer_1.weight" not in d2  # LPE checkpoints have only the norm
    with open(tmp_path / "model_final.pkl", "wb") as f:
        pickle.dump({"model": d2, "__author__": "test"}, f)

    assert (
        run_script(
            "--src", str(tmp_path / "model_final.pkl"), "--format", "detectron2", "--out", str(tmp_path / "out.pth")
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pkl", "out.pth"]  # no temp file left

    target = tiny_model(backbone, lpe=lpe, seed=1).eval()
    report = load_into(target, torch.load(tmp_path / "out.pth"))
    assert report.ok
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(images)["pred_masks"], source(images)["pred_masks"], rtol=0, atol=0)


def hf_resnet26(num_labels: int = 3):
    """HF Mask2Former whose ResNet is timm's resnet26 (bottleneck, depths 2-2-2-2)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    backbone = ResNetConfig(
        depths=[2, 2, 2, 2],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        num_queries=4,
        num_attention_heads=4,
        num_labels=num_labels,
        encoder_layers=2,
    )
    return Mask2FormerForUniversalSegmentation(config)


def test_hf_safetensors_through_the_script(tmp_path):
    import transformers  # noqa: F401  (a dev dependency: missing means a broken install)
    hf = hf_resnet26()
    state = hf.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    assert (
        run_script("--src", str(tmp_path / "model.safetensors"), "--format", "hf", "--out", str(tmp_path / "out.pth"))
        == 0
    )
    converted = torch.load(tmp_path / "out.pth")
    target = tiny_model("resnet")
    assert load_into(target, converted).ok
    prefix = "model.transformer_module.decoder.layers.3.self_attn."
    fused = torch.cat([state[prefix + f"{p}_proj.weight"] for p in "qkv"])
    in_proj = target.transformer_decoder.transformer_self_attention_layers[3].self_attn.in_proj_weight
    torch.testing.assert_close(in_proj, fused, rtol=0, atol=0)
    torch.testing.assert_close(
        target.backbone.body.layer3[1].conv2.weight,
        state["model.pixel_level_module.encoder.encoder.stages.2.layers.1.layer.1.convolution.weight"],
    )
    # the dropped keys are exactly the documented ones
    assert set(state) - {k for k in state if not k.startswith("criterion.")} == {"criterion.empty_weight"}


def test_old_hf_swin_names_are_fused():
    key = "model.pixel_level_module.encoder.encoder.layers.1.blocks.0.attention.self.{}.weight"
    state = {key.format(p): torch.full((2, 2), float(i)) for i, p in enumerate(("query", "key", "value"))}
    state["model.pixel_level_module.encoder.encoder.layers.1.blocks.0.intermediate.dense.bias"] = torch.zeros(8)
    state["model.pixel_level_module.encoder.encoder.layers.1.blocks.0.output.dense.bias"] = torch.zeros(2)
    state["model.pixel_level_module.encoder.encoder.layers.1.downsample.reduction.weight"] = torch.zeros(2)
    state["model.pixel_level_module.encoder.hidden_states_norms.stage3.weight"] = torch.zeros(2)
    out = hf_to_proscale(state)
    qkv = out.pop("backbone.body.layers_1.blocks.0.attn.qkv.weight")
    assert qkv[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert sorted(out) == [
        "backbone.body.layers_1.blocks.0.mlp.fc1.bias",
        "backbone.body.layers_1.blocks.0.mlp.fc2.bias",
        "backbone.body.layers_2.downsample.reduction.weight",
        "backbone.output_norms.2.weight",
    ]
    with pytest.raises(ValueError, match=r"\['v'\]"):
        hf_to_proscale({key.format("query"): torch.zeros(1), key.format("key"): torch.zeros(1)})


def test_checkpoint_that_does_not_fit_raises_naming_keys():
    model = tiny_model("resnet")
    state = detectron2_to_proscale({k: torch.from_numpy(v) for k, v in to_detectron2(model).items()})
    state.pop("transformer_decoder.class_embed.weight")
    state["transformer_decoder.unknown.weight"] = torch.zeros(1)
    state["pixel_decoder.mask_features.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as err:
        load_into(model, state)
    message = str(err.value)
    assert "transformer_decoder.class_embed.weight" in message  # missing
    assert "transformer_decoder.unknown.weight" in message  # unused
    assert "pixel_decoder.mask_features.bias" in message  # shape mismatch
    state["transformer_decoder.query_feat.weight"] = torch.randn_like(state["transformer_decoder.query_feat.weight"])
    report = load_into(model, state, allow_partial=True)
    assert report.missing == ["transformer_decoder.class_embed.weight"]
    assert report.unused == ["transformer_decoder.unknown.weight"]
    assert [m[0] for m in report.mismatched] == ["pixel_decoder.mask_features.bias"]
    # the fitting keys were loaded
    torch.testing.assert_close(
        model.transformer_decoder.query_feat.weight, state["transformer_decoder.query_feat.weight"]
    )


def test_reading_files(tmp_path):
    weights = {"a": torch.arange(3.0)}
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "lightning.ckpt")
    assert torch.equal(read_state_dict(tmp_path / "lightning.ckpt")["a"], weights["a"])
    write_state_dict(weights, tmp_path / "w.safetensors")
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["a"], weights["a"])
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    for name, message in [
        ("missing.pth", "does not exist"),
        ("broken.pth", "cannot read"),
        ("w.txt", "unknown checkpoint format"),
    ]:
        if name == "w.txt":
            (tmp_path / name).write_text("x")
        with pytest.raises(ValueError, match=message) as err:
            read_state_dict(tmp_path / name)
        assert name in str(err.value)
    with open(tmp_path / "odd.pkl", "wb") as f:
        pickle.dump({"model": {"w": "text"}}, f)
    with pytest.raises(ValueError, match="'w'"):
        read_state_dict(tmp_path / "odd.pkl")


def test_script_reports_bad_input(tmp_path, capsys):
    assert (
        run_script("--src", str(tmp_path / "nope.pkl"), "--format", "detectron2", "--out", str(tmp_path / "o.pth")) == 2
    )
    assert "nope.pkl" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()
