"""mmsae.sae.malloc.keep_freed_memory: a freed large block is reused, not faulted in afresh."""

import subprocess
import sys

import pytest

from mmsae.sae import malloc

CHILD = """
import resource, sys, torch
from mmsae.sae.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else None
make = lambda: torch.empty(64 << 18).fill_(1.0)  # 64 MiB, allocated, written, freed: one training step's temporary
for _ in range(10):  # the heap settles within a few blocks (up to 6 seen), then reuses them
    make()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    make()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_block(apply: bool) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if apply else "0"], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_freed_block_is_reused_without_page_faults():
    # glibc's default serves a 64 MiB block by mmap and unmaps it on free: every page faults again
    # (16384 4-KiB pages; fewer where transparent huge pages back every mapping)
    _, default = faults_per_block(False)
    assert default >= 32
    applied, tuned = faults_per_block(True)
    assert applied == "True"
    assert tuned <= 0.01 * default


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(malloc.sys, "platform", "darwin")
    assert malloc.keep_freed_memory() is False
