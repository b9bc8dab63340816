"""Two real gloo processes (torchrun) against one process on the same global batch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, timeout: int = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_clip_gradients_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "grad.json"
    torchrun(HERE / "clip_grad_worker.py", str(out))
    res = json.loads(out.read_text())
    for mode in ("False", "True"):  # without and with local_loss
        r = res[mode]
        assert abs(r["loss"] - r["ref_loss"]) < 1e-5, (mode, r)
        assert r["max_grad_diff"] < 1e-5 and r["max_grad"] > 1e-3 and r["n_params"] > 50, (mode, r)
