"""Compute / memory switches: activation checkpointing (same gradients), bf16-mixed (finite step, deformable
sampling in fp32), torch.compile (equal to eager, or a warning and eager; a clear message without a compiler)."""

from __future__ import annotations

import importlib
import math
import warnings

import hydra
import pytest
import torch
from hydra.errors import InstantiationException

import proscale.models.compute_options as compute_options
from proscale.models.compute_options import CompiledParts, check_compiler, parse_parts
from proscale.models.encoders.base import DeformableEncoderLayer
from proscale.tasks.train import train
from proscale.utils.hydra_utils import compose_config


def _tiny_model(tmp_path, *overrides: str, seed: int = 0) -> torch.nn.Module:
    cfg = compose_config("train", ["experiment=tiny", *overrides], output_dir=tmp_path)
    torch.manual_seed(seed)
    return hydra.utils.instantiate(cfg.model, num_classes=3)


def _loss(outputs: dict) -> torch.Tensor:
    """Every prediction (final and auxiliary) enters the loss, so every parameter gets a gradient."""
    total = outputs["pred_logits"].square().mean() + outputs["pred_masks"].sigmoid().mean()
    for aux in outputs["aux_outputs"]:
        total = total + aux["pred_logits"].square().mean() + aux["pred_masks"].sigmoid().mean()
    return total


@pytest.mark.parametrize("encoder", ["m2f", "proscale"])
def test_activation_checkpointing_gives_the_same_gradients(tmp_path, monkeypatch, encoder):
    images = torch.randn(2, 3, 64, 64)
    plain = _tiny_model(tmp_path, f"model/encoder={encoder}").train()
    checkpointed = _tiny_model(tmp_path, f"model/encoder={encoder}", "model.checkpointing=true").train()
    checkpointed.load_state_dict(plain.state_dict())

    calls = {"encoder": 0, "decoder": 0}
    real_encoder_layer, real_decoder_layer = DeformableEncoderLayer._forward, type(plain.transformer_decoder)._layer

    def counting_encoder_layer(self, *args, **kwargs):
        calls["encoder"] += 1
        return real_encoder_layer(self, *args, **kwargs)

    def counting_decoder_layer(self, *args, **kwargs):
        calls["decoder"] += 1
        return real_decoder_layer(self, *args, **kwargs)

    monkeypatch.setattr(DeformableEncoderLayer, "_forward", counting_encoder_layer)
    monkeypatch.setattr(type(plain.transformer_decoder), "_layer", counting_decoder_layer)

    _loss(plain(images)).backward()
    plain_calls = dict(calls)
    calls.update(encoder=0, decoder=0)
    _loss(checkpointed(images)).backward()
    # the checkpointed layers ran again in the backward pass: checkpointing is really on
    assert calls == {"encoder": 2 * plain_calls["encoder"], "decoder": 2 * plain_calls["decoder"]} and all(
        plain_calls.values()
    )

    grads = {name: p.grad for name, p in checkpointed.named_parameters()}
    compared = 0
    for name, param in plain.named_parameters():
        if param.grad is None:
            assert grads[name] is None, name
            continue
        assert grads[name].abs().max() > 0 or param.grad.abs().max() == 0
        torch.testing.assert_close(grads[name], param.grad, atol=1e-7, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        compared += 1
    assert compared > 50


def test_checkpointing_key_is_validated(tmp_path):
    with pytest.raises(InstantiationException, match=r"model.checkpointing=.*unknown part\(s\) \['backbone'\]"):
        _tiny_model(tmp_path, "model.checkpointing=backbone")
    assert parse_parts("encoder,decoder", ("encoder", "decoder"), "k") == ("encoder", "decoder")
    assert parse_parts(["decoder"], ("encoder", "decoder"), "k") == ("decoder",)
    assert parse_parts(False, ("encoder", "decoder"), "k") == ()


def test_checkpointing_warns_for_an_encoder_without_layers_to_checkpoint(tmp_path):
    with pytest.warns(UserWarning, match="RTM2FEncoder encoder has no layers that support activation checkpointing"):
        _tiny_model(tmp_path, "model/encoder=rt_m2f", "model.checkpointing=encoder")


def test_bf16_mixed_training_step_is_finite_with_fp32_sampling(tmp_path, monkeypatch):
    ops = importlib.import_module("proscale.models.ops.ms_deform_attn")  # the module (the package exports a function)

    seen: list[tuple] = []
    real_kernel = ops.ms_deform_attn_gather_from_offsets

    def recording_kernel(value, spatial_shapes, reference_points, offsets, weights):
        seen.append((torch.is_autocast_enabled("cpu"), value.dtype, offsets.dtype, weights.dtype))
        return real_kernel(value, spatial_shapes, reference_points, offsets, weights)

    monkeypatch.setattr(ops, "ms_deform_attn_gather_from_offsets", recording_kernel)
    logits_dtypes: list[torch.dtype] = []
    cfg = compose_config(
        "train",
        [
            "experiment=tiny",
            "num_threads=1",
            "trainer.enable_progress_bar=false",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "data.num_train=2",
            "data.num_val=2",
            "steps=2",
            "test=false",
            "trainer.limit_val_batches=0",
            "callbacks.compute_stats.timing_runs=0",
            "trainer.precision=bf16-mixed",
        ],
        output_dir=tmp_path / "run",
    )
    real_forward = type(hydra.utils.instantiate(cfg.model, num_classes=3).transformer_decoder).forward

    def recording_forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        logits_dtypes.append(out["pred_logits"].dtype)
        return out

    monkeypatch.setattr("proscale.models.transformer_decoder.MaskedTransformerDecoder.forward", recording_forward)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2 and objects["module"].nonfinite_total == 0
    assert math.isfinite(metrics["train/loss"])
    assert torch.bfloat16 in logits_dtypes  # autocast really ran the decoder in bf16
    assert seen and {autocast for autocast, *_ in seen} == {False}  # sampling always ran with autocast off ...
    assert {call[1:] for call in seen} == {(torch.float32,) * 3}  # ... and in fp32


def test_compile_without_a_working_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(compute_options, "_compiler_problem", lambda device: "CalledProcessError: g++ not found")
    with pytest.raises(ValueError, match=r"model.compile is on, but torch.compile cannot build kernels on cpu.*g\+\+"):
        check_compiler("cpu")
    with pytest.raises(InstantiationException, match="set model.compile=false"):
        _tiny_model(tmp_path, "model.compile=true")
    with pytest.raises(InstantiationException, match=r"model.compile=.*unknown part\(s\) \['head'\]"):
        _tiny_model(tmp_path, "model.compile=head")


def test_a_part_that_fails_to_compile_runs_eagerly_with_a_warning(monkeypatch):
    def broken_compile(module, **options):
        def call(*args):
            raise RuntimeError("backend failed: unsupported op\nlong details")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    parts = CompiledParts(("decoder",))
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match=r"the decoder could not be compiled \(RuntimeError: backend failed"):
        out = parts("decoder", layer, x)
    torch.testing.assert_close(out, layer(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later calls run eagerly without trying again
        torch.testing.assert_close(parts("decoder", layer, x), layer(x))
    assert parts("backbone", layer, x).shape == (4, 2)  # not a compiled part: plain call
    meta_parts = CompiledParts(("encoder",))
    assert meta_parts("encoder", layer.to("meta"), [torch.empty(4, 3, device="meta")][0]).device.type == "meta"
    assert not meta_parts.compiled and not meta_parts.failed  # FLOP counting on meta tensors never compiles


@pytest.mark.slow  # inductor builds C++ kernels on the CPU: minutes on a busy 2-core machine
def test_compiled_decoder_equals_eager(tmp_path):
    images = torch.randn(1, 3, 64, 64)
    eager = _tiny_model(tmp_path).eval()
    compiled = _tiny_model(tmp_path, "model.compile=[decoder]").eval()
    compiled.load_state_dict(eager.state_dict())
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected, actual = eager(images), compiled(images)
    fell_back = [w for w in caught if "could not be compiled" in str(w.message)]
    assert fell_back or compiled._parts.compiled  # compiled, or said why not
    torch.testing.assert_close(actual["pred_logits"], expected["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual["pred_masks"], expected["pred_masks"], atol=1e-4, rtol=1e-4)
