"""The documents point at files that exist: relative links in README.md and docs/*.md, and every `docs/<name>.md`
that a config, script or module names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
DOC_MENTION = re.compile(r"\bdocs/[\w-]+\.md\b")


def relative_links(path: Path) -> list[str]:
    links = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+://", target) or target.startswith(("#", "mailto:")):
            continue
        links.append(target.split("#", 1)[0])
    return [link for link in links if link]


def test_the_readme_links_every_document():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in MARKDOWN[1:] if f"docs/{p.name}" not in readme]
    assert len(MARKDOWN) > 5, "docs/ has gone"
    assert not missing, f"docs not linked from README.md: {missing}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    links = relative_links(path)
    broken = [link for link in links if not (path.parent / link).exists()]
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files {broken}"


def test_docs_named_in_configs_and_code_exist():
    named: dict[str, list[str]] = {}
    for folder in ("conf", "proscale", "scripts", "Makefile"):
        base = ROOT / folder
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.suffix in (".py", ".yaml")]
        for file in files:
            for mention in DOC_MENTION.findall(file.read_text(encoding="utf-8")):
                named.setdefault(mention, []).append(str(file.relative_to(ROOT)))
    assert "docs/training.md" in named  # the configs' pointer for batch size and learning rate
    missing = {doc: where for doc, where in named.items() if not (ROOT / doc).is_file()}
    assert not missing, f"documents named but not in docs/: {missing}"


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_the_new_encoder_example_works():
    """docs/new-encoder.md: its module registers an encoder, its YAML builds a model with it through Hydra, the
    model trains a step and is counted by the FLOP analysis, and the page's own test passes."""
    import hydra
    import torch
    from omegaconf import OmegaConf, open_dict

    from proscale.analysis.flops import count_flops
    from proscale.models.encoders import ENCODERS
    from proscale.utils.hydra_utils import compose_config

    page = ROOT / "docs" / "new-encoder.md"
    module_code, test_code = code_blocks(page, "python")
    (yaml_text,) = code_blocks(page, "yaml")
    namespace: dict = {"__name__": "proscale.models.encoders.coarse_m2f"}
    try:
        exec(compile(module_code, "docs/new-encoder.md", "exec"), namespace)
        assert "coarse_m2f" in ENCODERS
        cfg = compose_config("train", ["model.num_classes=5", "model/backbone=timm",
                                       "model.backbone.model_name=regnetx_002", "model.conv_dim=32",
                                       "model.mask_dim=32", "model.hidden_dim=32", "model.num_queries=4",
                                       "model.dec_layers=2"])  # fmt: skip
        node = OmegaConf.create(yaml_text)
        assert node.name == "coarse_m2f"
        with open_dict(cfg):
            cfg.model.encoder = node
            cfg.model.encoder.update(n_heads=4, dim_feedforward=64, num_layers=2)
        model = hydra.utils.instantiate(cfg.model)
        assert type(model.pixel_decoder.encoder).__name__ == "CoarseM2FEncoder"
        out = model(torch.randn(1, 3, 64, 96))
        (out["pred_logits"].sum() + out["pred_masks"].sum()).backward()
        grads = [p.grad for p in model.pixel_decoder.encoder.parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        flops = count_flops(model.eval(), image_size=(64, 96), orig_size=(64, 96))
        assert flops["encoder_layers"] > 0

        test_namespace = {"ENCODERS": ENCODERS, "torch": torch}
        exec(compile(test_code, "docs/new-encoder.md", "exec"), test_namespace)
        test_namespace["test_coarse_m2f_leaves_the_finest_map_alone"]()
    finally:
        ENCODERS._entries.pop("coarse_m2f", None)  # the example is not one of the project's encoders
