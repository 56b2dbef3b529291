#!/usr/bin/env python
"""Convert Mask2Former weights to proscale names.

    python scripts/convert_weights.py --src model_final.pkl --format detectron2 --out m2f_r50.pth
    python scripts/convert_weights.py --src model.safetensors --format hf --out m2f_swin_t.pth
    python scripts/convert_weights.py --src proscale_r50_333.pth --format proscale --out proscale_r50.pth

``--src``: a detectron2 / Mask2Former model-zoo ``.pkl`` (numpy arrays under "model"), a ``.pth`` / ``.pt`` /
``.ckpt`` or a ``.safetensors`` file. ``--format``: ``hf`` (transformers' Mask2FormerForUniversalSegmentation)
or ``detectron2`` (the original implementation) or ``proscale`` (the official PRO-SCALE release: flat encoder
layers, TRC, LPE; the schedule and the Hydra overrides that rebuild the model are printed). ``--out``: ``.pth`` (or ``.safetensors``), written
atomically. Load the result with ``proscale.convert.load_into(model, torch.load(out))``, which reports
missing / unused keys and refuses partial loads unless asked. Bad input exits with status 2 and a message
naming the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proscale.convert import (  # noqa: E402
    detectron2_to_proscale,
    hf_to_proscale,
    official_encoder_config,
    proscale_official_to_proscale,
)
from proscale.convert.io import read_state_dict, write_state_dict  # noqa: E402

CONVERTERS = {"hf": hf_to_proscale, "detectron2": detectron2_to_proscale, "proscale": proscale_official_to_proscale}


def _override_value(value: object) -> str:
    """A Python value as Hydra override syntax (true/false, [a,b,c])."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="checkpoint to convert (.pkl, .pth, .pt, .ckpt, .safetensors)")
    parser.add_argument("--format", required=True, choices=sorted(CONVERTERS), help="naming of --src")
    parser.add_argument("--out", required=True, help="output file (.pth or .safetensors)")
    args = parser.parse_args(argv)
    try:
        state = read_state_dict(args.src)
        converted = CONVERTERS[args.format](state)
        if args.format == "proscale":
            settings = official_encoder_config(state)
            lpe = settings.pop("lpe")
            overrides = ["model/encoder=proscale", f"model.lpe={str(lpe).lower()}"]
            overrides += [f"model.encoder.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in settings.items()]
            print(
                "build the model with: "
                + " ".join(overrides).replace(", ", ",").replace("True", "true").replace("False", "false")
            )
        out = write_state_dict(converted, args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"converted {len(state)} tensors from {args.src} ({args.format}) -> {len(converted)} tensors in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
