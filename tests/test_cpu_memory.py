"""proscale.utils.cpu_memory: large freed CPU tensors are reused without new page faults (glibc / Linux)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e  # runs the apps / launchers in subprocesses

SCRIPT = """
import resource, torch
from proscale.utils.cpu_memory import retain_freed_memory
applied = retain_freed_memory()
def faults_of_allocation(megabytes):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(megabytes * 1024 * 1024 // 4)
    x.fill_(1.0)  # touch every page
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# 48 MB: above glibc's largest dynamic mmap threshold (32 MB), so by default it is mmapped and unmapped on free;
# retained, the freed block serves the next (smaller, so it surely fits) 40 MB tensor from warm pages
faults_of_allocation(48)
print(applied, faults_of_allocation(40))
"""


def _run(env_value: str | None) -> tuple[bool, int]:
    env = None
    if env_value is not None:
        import os

        env = {**os.environ, "PROSCALE_RETAIN_FREED_MEMORY": env_value}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_reused_without_page_faults_and_can_be_turned_off():
    applied, faults = _run(None)
    assert applied
    assert faults < 200, faults  # warm pages: none of the 10,240 pages of 40 MB is faulted in again
    applied_off, faults_off = _run("0")
    assert not applied_off
    assert faults_off >= 10_000, faults_off  # default glibc: mmap + munmap, every page faults again
