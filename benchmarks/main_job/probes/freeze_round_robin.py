"""Mask2Former step with backbone stages frozen, configurations timed round-robin in one process (probe).

    PROSCALE_DATA=/path/to/data python benchmarks/main_job/probes/freeze_round_robin.py
"""

import time

from _setup import compose_main_job, prepared_training, train_step

module, optimizer, batches = prepared_training(compose_main_job(), 10)
body = module.model.backbone.body
configurations = {"nothing": [], "stem+s1": ["stem", "s1"], "stem..s2": ["stem", "s1", "s2"], "backbone": ["stem", "s1", "s2", "s3", "s4"]}


def freeze(prefixes):
    for name, parameter in body.named_parameters():
        parameter.requires_grad_(not any(name.startswith(p + ".") for p in prefixes))


for batch in batches[:3]:
    train_step(module, optimizer, batch)
times = {name: [] for name in configurations}
for _ in range(3):
    for name, prefixes in configurations.items():
        freeze(prefixes)
        start = time.perf_counter()
        for batch in batches:
            train_step(module, optimizer, batch)
        times[name].append((time.perf_counter() - start) / len(batches) * 1000)
for name, values in times.items():
    print(f"frozen {name:9s}: " + " / ".join(f"{v:.0f}" for v in values) + " ms/step")
