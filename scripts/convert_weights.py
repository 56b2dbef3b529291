#!/usr/bin/env python
"""Convert Mask2Former / PRO-SCALE weights of any supported layout to proscale names.

    python scripts/convert_weights.py --src model_final.pkl --out m2f_r50.safetensors
    python scripts/convert_weights.py --src hf_mask2former_folder/ --out m2f_swin_t.safetensors
    python scripts/convert_weights.py --src proscale_r50_333.pth --format proscale --out proscale_r50.safetensors

``--src``: a file or a Hugging Face Mask2Former folder; the layout is found by content
(:func:`proscale.weights.read_weights`): this project's Lightning checkpoint (EMA weights when its run evaluated
with EMA; ``--raw`` for the others), a plain state dict, the official PRO-SCALE release, detectron2 / official
Mask2Former (``.pkl`` or ``.pth``), Hugging Face. ``--format`` is optional; when given it must match the content.
``--out`` (default: ``<src>_proscale.safetensors``): ``.safetensors`` is preferred (it cannot hold code, and its
header keeps the model config / derived overrides, so ``weights=OUT`` rebuilds the same model); ``.pth`` writes a
plain ``{name: tensor}`` file. Written atomically. The overrides that rebuild the model are printed.
Pickles that need arbitrary unpickling are refused unless ``--unsafe`` (only for files you trust). Bad input exits
with status 2 and a message naming the file; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from proscale.convert.io import write_state_dict
from proscale.utils.io import atomic_save_safetensors
from proscale.weights import FORMATS, LoadedWeights, read_weights
from proscale.weights.formats import METADATA_PREFIX

# --format names: the content-detected names, plus "proscale" for the official PRO-SCALE release
FORMAT_ALIASES = {"proscale": "proscale_official", **{name: name for name in FORMATS}}


def _override_value(value: object) -> str:
    """A Python value as Hydra override syntax (true/false, [a,b,c])."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def hydra_overrides(derived: dict) -> list[str]:
    """Derived overrides as command-line overrides (``model/encoder=proscale model.encoder.schedule=[3,3,3] ...``)."""
    out = []
    for key, value in derived.items():
        if key == "encoder.name":
            out.append(f"model/encoder={value}")
        elif key == "backbone.name":
            out.append(f"model/backbone={value}")
        else:
            out.append(f"model.{key}={_override_value(value)}")
    return out


def write_converted(loaded: LoadedWeights, out: Path) -> Path:
    """``.safetensors`` with the model config / derived overrides in its header, or a plain ``torch.save``."""
    if out.suffix.lower() != ".safetensors":
        return write_state_dict(loaded.state_dict, out)
    metadata = {METADATA_PREFIX + "source_format": loaded.format}
    for field in ("model_config", "derived_overrides", "meta", "inference", "test_transforms"):
        value = getattr(loaded, field)
        if value:
            metadata[METADATA_PREFIX + field] = json.dumps(value)
    tensors = {k: v.detach().contiguous().cpu() for k, v in loaded.state_dict.items()}
    return atomic_save_safetensors(out, tensors, metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="weight file or Hugging Face folder to convert")
    parser.add_argument(
        "--format", choices=sorted(FORMAT_ALIASES), help="expected layout of --src (optional: found by content)"
    )
    parser.add_argument(
        "--out", help="output file (.safetensors preferred, or .pth); default <src>_proscale.safetensors"
    )
    parser.add_argument("--raw", action="store_true", help="Lightning checkpoints: the raw weights, not the EMA ones")
    parser.add_argument(
        "--unsafe", action="store_true", help="allow pickles that need arbitrary unpickling (they can run code)"
    )
    args = parser.parse_args(argv)
    src = Path(args.src)
    out = Path(args.out) if args.out else src.with_name(src.stem + "_proscale.safetensors")
    try:
        if out.resolve() == src.resolve():
            raise ValueError(f"--out {out} is --src: choose another output file")
        loaded = read_weights(src, use_ema=not args.raw, allow_unsafe=args.unsafe)
        if args.format and FORMAT_ALIASES[args.format] != loaded.format:
            raise ValueError(
                f"--format {args.format} but {src} holds {loaded.format} weights (found by content); drop --format "
                "or pass the right file"
            )
        if loaded.model_config:
            print(
                f"{src}: this project's checkpoint; its model config is stored"
                + (" (EMA weights)" if loaded.ema else "")
            )
        elif loaded.derived_overrides:
            print("build the model with: " + " ".join(hydra_overrides(loaded.derived_overrides)))
        written = write_converted(loaded, out)
    except ValueError as err:  # UnsafeFileError included: it names the file and --unsafe
        print(f"error: {err}", file=sys.stderr)
        return 2
    note = "" if written.suffix == ".safetensors" else " (.safetensors is preferred: it keeps the overrides above)"
    print(f"converted {src} ({loaded.format}) -> {len(loaded.state_dict)} tensors in {written}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
