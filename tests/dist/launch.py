"""Start real multi-process runs for the distributed tests (torchrun with gloo on CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mmcl.testing.spawn import free_port


def torchrun(script: Path, *args: str, timeout: int = 240, nproc: int = 2, cpu: bool = True) -> str:
    """Run ``script`` in ``nproc`` processes; fails the test with the output's tail unless all exit 0.
    ``cpu``: ``ACCELERATE_USE_CPU=1`` (without it, Accelerate under torchrun on a machine without
    GPUs reports one process while torch.distributed has ``nproc``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        out = proc.stdout + proc.stderr
        causes = [line for line in out.splitlines() if re.search(r"Error|terminate|what\(\)|Signal|signal", line)]
        raise AssertionError("\n".join(causes[:40]) + "\n--- output tail ---\n" + out[-6000:])
    return proc.stdout
