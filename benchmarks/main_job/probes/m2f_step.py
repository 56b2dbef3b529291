"""Mask2Former training step of the main job's preset, without data loading or Lightning (probe).

    PROSCALE_DATA=/path/to/data python benchmarks/main_job/probes/m2f_step.py [overrides, e.g. variant=p111]
    PROF=1 ...   adds a torch-profiler table of 10 steps
"""

import os
import sys
import time

from _setup import compose_main_job, prepared_training, train_step

steps = int(os.environ.get("N", "25"))
module, optimizer, batches = prepared_training(compose_main_job(*sys.argv[1:]), steps + 5)
for batch in batches[:5]:
    train_step(module, optimizer, batch)
start = time.perf_counter()
for batch in batches[5:]:
    train_step(module, optimizer, batch)
print(f"{(time.perf_counter() - start) / steps * 1000:.1f} ms/step ({' '.join(sys.argv[1:]) or 'preset'})")
if os.environ.get("PROF"):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[5:15]:
            train_step(module, optimizer, batch)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
