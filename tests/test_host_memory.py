"""retain_freed_memory: a step's freed activations are reused, not page-faulted in again each step."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from train.host_memory import glibc

ROOT = Path(__file__).resolve().parents[1]

# A training step's pattern in miniature: activations of several sizes (2-10 MB) alive together,
# then all freed. Prints the minor page faults per step after a warm-up step.
STEPS = """
import resource, sys
import numpy as np
from train.host_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def step():
    held = [np.ones(n) for n in (300_000, 900_000, 450_000, 1_200_000, 300_000, 700_000)]
    return sum(a[0] for a in held)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout)


@pytest.mark.skipif(glibc() is None, reason="the C library is not glibc: nothing to tune")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    # glibc as shipped hands these blocks back at free: each step faults ~2,600 pages (10 MB) in again.
    assert faults_per_step("default") > 1000
    assert faults_per_step("retain") < 10
