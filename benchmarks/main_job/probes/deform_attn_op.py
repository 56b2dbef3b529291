"""The deformable-attention op at the main job's shapes: forward, and forward + backward (probe).

    python benchmarks/main_job/probes/deform_attn_op.py
"""

import time

import torch
from _setup import REPO  # noqa: F401 -- puts the repository on sys.path

from proscale.models.ops.ms_deform_attn_gather import ms_deform_attn_gather_from_offsets

torch.set_num_threads(2)
shapes = [(16, 20), (8, 10), (4, 5)]  # res3..res5 of 128x160
tokens = sum(h * w for h, w in shapes)
heads, dim, levels, points = 4, 16, 3, 4
for batch, queries in [(8, tokens), (1, tokens), (32, tokens)]:
    value = torch.randn(batch, tokens, heads, dim, requires_grad=True)
    reference = torch.rand(batch, queries, levels, 2)
    offsets = torch.randn(batch, queries, heads, levels, points, 2, requires_grad=True)
    weights = torch.rand(batch, queries, heads, levels, points).softmax(-1).requires_grad_()

    def both(value=value, reference=reference, offsets=offsets, weights=weights):
        ms_deform_attn_gather_from_offsets(value, shapes, reference, offsets, weights).sum().backward()

    for _ in range(5):
        both()
    start = time.perf_counter()
    for _ in range(30):
        both()
    total = (time.perf_counter() - start) / 30 * 1000
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(30):
            ms_deform_attn_gather_from_offsets(value, shapes, reference, offsets, weights)
    forward = (time.perf_counter() - start) / 30 * 1000
    print(f"batch {batch}, {queries} queries: forward {forward:.2f} ms, forward + backward {total:.2f} ms")
