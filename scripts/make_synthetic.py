#!/usr/bin/env python
"""Write the generated default dataset (COCO panoptic + instance format) to a folder.

    python scripts/make_synthetic.py                       # data/synthetic with the default parameters
    python scripts/make_synthetic.py --out /tmp/shapes --num-train 1000 --num-val 200 --height 192 --width 256

Reuses an existing dataset with identical parameters; regenerates one with other parameters; never
overwrites a folder that is not a generated dataset. The datamodule (``data=synthetic``) does the same on
first use, so running this is optional.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

from proscale.data.synthetic import SyntheticConfig, ensure_synthetic, is_current


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"), help="dataset folder")
    defaults = SyntheticConfig()
    for field in fields(SyntheticConfig):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
        )
    args = parser.parse_args(argv)
    cfg = SyntheticConfig(**{f.name: getattr(args, f.name) for f in fields(SyntheticConfig)})
    reused = is_current(args.out, cfg)
    start = time.perf_counter()
    root = ensure_synthetic(args.out, cfg)
    action = "reused" if reused else f"generated in {time.perf_counter() - start:.1f} s"
    print(
        f"synthetic dataset at {root} ({cfg.num_train} train + {cfg.num_val} val, {cfg.height}x{cfg.width}): {action}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
