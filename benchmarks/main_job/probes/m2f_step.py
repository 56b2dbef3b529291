"""Mask2Former training step of the main job's preset, without data loading or Lightning (probe).

    PROSCALE_DATA=/path/to/data python benchmarks/main_job/probes/m2f_step.py [overrides, e.g. variant=p111]
    PROF=1 ...   adds a torch-profiler table of 10 steps
"""

import os
import sys
import time

import torch
from _setup import compose_main_job

from proscale.tasks.run import build_datamodule_and_module

steps = int(os.environ.get("N", "25"))
cfg = compose_main_job(*sys.argv[1:])
torch.set_num_threads(2)
datamodule, module = build_datamodule_and_module(cfg)
datamodule.prepare_data()
datamodule.setup("fit")
loader = iter(datamodule.train_dataloader())
optimizer = module.optimizer_factory(module.model)
module.model.train()
batches = [next(loader) for _ in range(steps + 5)]


def step(batch):
    outputs = module.model(batch["images"])
    loss = module.criterion.total_loss(module.criterion(outputs, batch["targets"]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


for batch in batches[:5]:
    step(batch)
start = time.perf_counter()
for batch in batches[5:]:
    step(batch)
print(f"{(time.perf_counter() - start) / steps * 1000:.1f} ms/step ({' '.join(sys.argv[1:]) or 'preset'})")
if os.environ.get("PROF"):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[5:15]:
            step(batch)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
