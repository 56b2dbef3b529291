"""One way to load weights: every format, written in its real layout with random weights, goes through
``read_weights`` -> ``resolve_model_config`` -> ``load_weights_into`` and gives a model whose outputs equal the
source's; bad files fail with errors naming the file and what does not fit."""

from __future__ import annotations

import pickle

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from test_convert import hf_resnet26, tiny_model, to_detectron2

from proscale.convert import hf_to_proscale, load_into
from proscale.models import Mask2Former, build_backbone
from proscale.models.encoders import ProScaleEncoder
from proscale.weights import load_weights_into, read_weights, resolve_model_config

# A configured model that differs from the files' in everything the weights tell (backbone, encoder type, widths,
# queries, classes, LPE); what they cannot tell (attention heads, points) matches the tiny source models.
BASE = {
    "_target_": "proscale.models.Mask2Former",
    "backbone": {"_target_": "proscale.models.backbones.build_backbone", "name": "timm", "model_name": "resnet18"},
    "encoder": {
        "_target_": "proscale.models.encoders.ProScaleEncoder",
        "d_model": "${..conv_dim}",
        "schedule": [3, 3, 3],
        "n_heads": 4,
        "n_points": 4,
        "dim_feedforward": 1024,
    },
    "num_classes": 133,
    "conv_dim": 256,
    "mask_dim": 256,
    "lpe": True,
    "num_queries": 100,
    "dec_layers": 9,
    "hidden_dim": 256,
    "dim_feedforward": 2048,
    "nheads": 4,
}
IMAGES = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))


def build(loaded, base=BASE, explicit=None, allow_partial=False):
    cfg = resolve_model_config(OmegaConf.create(base), loaded, explicit or {})
    model = hydra.utils.instantiate(cfg)
    load_weights_into(model, loaded, allow_partial=allow_partial)
    return model.eval(), cfg


def assert_same_outputs(model, reference):
    with torch.no_grad():
        ours, theirs = model(IMAGES), reference.eval()(IMAGES)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def tensors(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


# ------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("container, backbone", [("pkl", "resnet"), ("pth", "resnet"), ("pkl", "swin")])
def test_detectron2_mask2former(tmp_path, container, backbone):
    source = tiny_model(backbone, lpe=False, seed=0)
    d2 = to_detectron2(source)
    path = tmp_path / f"model_final.{container}"
    if container == "pkl":  # model-zoo layout: numpy arrays under "model"
        path.write_bytes(pickle.dumps({"model": d2, "__author__": "test"}, protocol=2))
    else:
        torch.save({"model": {k: torch.from_numpy(v) for k, v in d2.items()}, "iteration": 9}, path)
    loaded = read_weights(path)
    assert loaded.format == "detectron2" and loaded.model_config is None
    assert loaded.derived_overrides["encoder.name"] == "m2f"
    model, cfg = build(loaded)
    assert (cfg.num_classes, cfg.num_queries, cfg.conv_dim, cfg.lpe) == (3, 4, 32, False)
    assert cfg.encoder.num_layers == 2 and cfg.encoder.n_heads == 4
    if backbone == "resnet":
        assert cfg.backbone.model_name == "resnet26"
    else:  # a small Swin: its sizes are read off the weights
        assert (cfg.backbone.embed_dim, cfg.backbone.depths, cfg.backbone.num_heads) == (32, [1, 1, 2, 1], [1, 2, 4, 8])
    assert "schedule" not in cfg.encoder  # the PRO-SCALE node was replaced by the M2F one
    assert_same_outputs(model, source)


def official_model(seed=0, num_classes=5) -> Mask2Former:
    torch.manual_seed(seed)
    encoder = ProScaleEncoder(d_model=32, schedule=(2, 1, 1), n_heads=4, n_points=4, dim_feedforward=64,
                              trc_layout="released")  # fmt: skip
    return Mask2Former(
        build_backbone("timm", model_name="resnet26"), encoder, num_classes=num_classes, conv_dim=32, mask_dim=32, lpe=True,
        num_queries=6, dec_layers=3, hidden_dim=32, dim_feedforward=64, nheads=4,
    )  # fmt: skip


def to_official(model: Mask2Former) -> dict:
    """The official release's names: detectron2 Mask2Former + ``token_excite.ops`` for TRC."""
    trc = "sem_seg_head.pixel_decoder.transformer.encoder.trc.linear."
    return {
        (k.replace(trc, "sem_seg_head.pixel_decoder.transformer.encoder.token_excite.ops.")): torch.from_numpy(v)
        for k, v in to_detectron2(model).items()
    }


def test_official_proscale(tmp_path):
    source = official_model()
    path = tmp_path / "proscale_r50_211.pth"
    torch.save({"model": to_official(source), "iteration": 1}, path)
    loaded = read_weights(path)
    assert loaded.format == "proscale_official"
    derived = loaded.derived_overrides
    assert derived["encoder.schedule"] == [2, 1, 1] and derived["encoder.trc"] is True and derived["lpe"] is True
    assert derived["encoder.trc_layout"] == "released" and derived["encoder.trc_temperature"] == 0.1
    model, cfg = build(loaded)
    assert (cfg.num_classes, cfg.num_queries, cfg.dec_layers) == (5, 6, 3)
    assert_same_outputs(model, source)


@pytest.mark.parametrize("layout", ["pth", "module_prefix", "model_prefix", "safetensors"])
def test_plain_state_dict(tmp_path, layout):
    source = official_model(seed=1)
    state = tensors(source)
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pt")
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        prefix = {"pth": "", "module_prefix": "module.", "model_prefix": "model."}[layout]
        extra = {"criterion.empty_weight": torch.ones(6)} if prefix == "model." else {}
        torch.save({**{prefix + k: v for k, v in state.items()}, **extra}, path)
    loaded = read_weights(path)
    assert loaded.format == "state_dict"
    assert loaded.derived_overrides["encoder.schedule"] == [2, 1, 1]
    # the TRC layout is not in the weights: the configured one is kept, so set it as the source was built
    model, _ = build(loaded, base={**BASE, "encoder": {**BASE["encoder"], "trc_layout": "released"}})
    assert_same_outputs(model, source)


def test_hugging_face_folder(tmp_path):
    import transformers  # noqa: F401  (a dev dependency: missing means a broken install)
    torch.manual_seed(0)
    hf = hf_resnet26()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    reference = tiny_model("resnet")
    assert load_into(reference, hf_to_proscale(hf.state_dict())).ok
    loaded = read_weights(tmp_path / "hf")
    assert loaded.format == "hf"
    # config.json gives the head count the weights cannot: 4, where the configured model says 8
    model, cfg = build(loaded, base={**BASE, "nheads": 8, "encoder": {**BASE["encoder"], "n_heads": 8}})
    assert cfg.nheads == 4 and cfg.encoder.n_heads == 4 and cfg.dec_layers == 9
    assert_same_outputs(model, reference)


def lightning_checkpoint(path, model, ema_model=None, model_config=None):
    """The layout this project's training writes (module state under ``model.``, EMA shadow under ``ema``)."""
    hparams = {"model_config": model_config, "meta": {"num_classes": 3}, "ema_decay": 0.99 if ema_model else None}
    checkpoint = {
        "state_dict": {"model." + k: v for k, v in model.state_dict().items()}
        | {"criterion.empty_weight": torch.ones(4)},
        "hyper_parameters": hparams,
        "pytorch-lightning_version": "2.6.0",
        "global_step": 3,
    }
    if ema_model is not None:
        checkpoint["ema"] = {"decay": 0.99, "num_updates": 3, "shadow": ema_model.state_dict()}
    torch.save(checkpoint, path)


def test_lightning_checkpoint_takes_ema_and_stored_config(tmp_path):
    raw, ema = tiny_model("resnet", seed=0), tiny_model("resnet", seed=1)
    config = {**BASE, "backbone": {**BASE["backbone"], "model_name": "resnet26"},
              "encoder": {"_target_": "proscale.models.encoders.M2FEncoder", "d_model": "${..conv_dim}",
                          "num_layers": 2, "n_heads": 4, "dim_feedforward": 64},
              "num_classes": 3, "conv_dim": 32, "mask_dim": 32, "lpe": False, "num_queries": 4, "hidden_dim": 32,
              "dim_feedforward": 64}  # fmt: skip
    lightning_checkpoint(tmp_path / "run.ckpt", raw, ema, config)
    loaded = read_weights(tmp_path / "run.ckpt")
    assert loaded.format == "lightning" and loaded.ema and loaded.meta == {"num_classes": 3}
    model, _ = build(loaded, base={"_target_": "unused"})  # the stored config wins over the configured one
    assert_same_outputs(model, ema)
    raw_loaded = read_weights(tmp_path / "run.ckpt", use_ema=False)
    assert not raw_loaded.ema
    assert_same_outputs(build(raw_loaded)[0], raw)
    # explicit command-line values win over the stored config
    cfg = resolve_model_config(OmegaConf.create(BASE), loaded, {"num_queries": 7})
    assert cfg.num_queries == 7 and cfg.num_classes == 3


def test_converted_safetensors_keep_the_derived_overrides(tmp_path, capsys):
    """scripts/convert_weights.py --out x.safetensors stores what the weights cannot tell (TRC layout)."""
    from test_convert import run_script

    source = official_model(seed=2)
    torch.save({"model": to_official(source)}, tmp_path / "official.pth")
    assert run_script("--src", str(tmp_path / "official.pth"), "--out", str(tmp_path / "c.safetensors")) == 0
    assert "model/encoder=proscale" in capsys.readouterr().out
    loaded = read_weights(tmp_path / "c.safetensors")
    assert loaded.format == "state_dict" and loaded.derived_overrides["encoder.trc_layout"] == "released"
    assert_same_outputs(build(loaded)[0], source)


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_format_and_other_architecture(tmp_path):
    (tmp_path / "notes.pth").write_text("just text")
    with pytest.raises(ValueError, match=r"notes\.pth: unknown format"):
        read_weights(tmp_path / "notes.pth")
    resnet = build_backbone("timm", model_name="resnet18").body.state_dict()  # an ImageNet classifier's names
    torch.save(resnet, tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match=r"resnet18\.pth: not a Mask2Former checkpoint.*conv1\.weight"):
        read_weights(tmp_path / "resnet18.pth")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        read_weights(tmp_path / "folder")
    with pytest.raises(ValueError, match="missing.pth: no such file"):
        read_weights(tmp_path / "missing.pth")


def test_weights_of_another_architecture_do_not_load(tmp_path):
    """A stored Mask2Former of another size into a fixed model: strict error naming the file and keys."""
    torch.save(tensors(tiny_model("resnet")), tmp_path / "m2f.pth")
    loaded = read_weights(tmp_path / "m2f.pth")
    model = official_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"m2f\.pth \(state_dict\) do not fit the model.*missing") as error:
        load_weights_into(model, loaded)
    assert "weights_allow_partial=true" in str(error.value) and "reshaped" in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing copied
    report = load_weights_into(model, loaded, allow_partial=True)
    assert report.missing and report.mismatched
    torch.testing.assert_close(model.backbone.body.conv1.weight, loaded.state_dict["backbone.body.conv1.weight"])


def test_explicit_override_conflicting_with_the_file_names_both(tmp_path):
    torch.save({"model": to_official(official_model())}, tmp_path / "official.pth")
    loaded = read_weights(tmp_path / "official.pth")
    with pytest.raises(ValueError, match=r"model\.num_classes=7 .*official\.pth.*model\.num_classes=5"):
        resolve_model_config(OmegaConf.create(BASE), loaded, {"num_classes": 7})
    with pytest.raises(ValueError, match=r"model\.encoder\.schedule=\[3,3,3\].*\[2,1,1\]"):
        resolve_model_config(OmegaConf.create(BASE), loaded, {"encoder.schedule": [3, 3, 3]})
    # agreeing values are fine
    assert resolve_model_config(OmegaConf.create(BASE), loaded, {"num_classes": 5}).num_classes == 5


@pytest.mark.parametrize("kind", ["pth", "safetensors", "pkl"])
def test_truncated_files_are_clear_errors(tmp_path, kind):
    state = tensors(tiny_model("resnet"))
    path = tmp_path / f"w.{kind}"
    if kind == "pth":
        torch.save(state, path)
    elif kind == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        path.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in state.items()}}, protocol=4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"w\\.{kind}"):
        read_weights(path)
