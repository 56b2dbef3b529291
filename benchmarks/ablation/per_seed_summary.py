"""Per-seed results of an ablation sweep (`python benchmarks/ablation/per_seed_summary.py <sweep folder>`): every
configuration's metrics over its seeds, LPE on - off per schedule, each configuration vs M2F with the same LPE setting
(Welch 95 % intervals; * = the interval excludes 0)."""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from proscale.reporting.stats import welch_difference

METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")


def main(sweep: Path) -> None:
    groups = defaultdict(list)
    for path in sorted(sweep.glob("lane*/*/results.json")) or sorted(sweep.glob("*/results.json")):
        result = json.loads(path.read_text())
        tags = result["tags"]
        groups[(tags["encoder"], tags["schedule"] or "-", bool(tags["lpe"]))].append(result)

    def values(key, metric):
        return [float(r[metric]) for r in groups[key]]

    def spread(v):
        return statistics.stdev(v) if len(v) > 1 else float("nan")

    def difference(a, b, label):
        d = welch_difference(a, b)
        star = "*" if d.low == d.low and not (d.low <= 0 <= d.high) else " "
        print(f"  {label}: {d.value:+.2f} [{d.low:+.2f}, {d.high:+.2f}] {star}")

    print("(encoder, schedule, LPE) | runs | " + " | ".join(METRICS) + " (mean +- sample std)")
    for key in sorted(groups):
        cells = [f"{statistics.fmean(values(key, m)):.2f} +- {spread(values(key, m)):.2f}" for m in METRICS]
        print(key, len(groups[key]), " | ".join(cells), "seeds", sorted(r["tags"]["seed"] for r in groups[key]))
    print("\nLPE on - off:")
    for encoder, schedule in sorted({(k[0], k[1]) for k in groups}):
        on, off = (encoder, schedule, True), (encoder, schedule, False)
        if on in groups and off in groups:
            for metric in ("PQ", "PQ_th", "PQ_st"):
                difference(values(on, metric), values(off, metric), f"{encoder} {schedule} {metric}")
    print("\nvs M2F with the same LPE setting:")
    for key in sorted(groups):
        reference = ("m2f", "-", key[2])
        if key != reference and reference in groups:
            for metric in ("PQ", "PQ_th"):
                difference(values(key, metric), values(reference, metric), f"{key} {metric}")
    pooled_on = [float(r["PQ"]) for k in groups if k[2] for r in groups[k]]
    pooled_off = [float(r["PQ"]) for k in groups if not k[2] for r in groups[k]]
    print(f"\nLPE pooled over schedules ({len(pooled_on)} vs {len(pooled_off)} runs):")
    difference(pooled_on, pooled_off, "PQ")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
