"""Real multi-process checks in one test: rank 0 in the test's own process, the other ranks in
spawned processes, all on a gloo group over 127.0.0.1 (test support, used by ``tests/``)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_with_other_ranks(here: Callable[[], None], other_rank: Callable[[int, int], None], processes: int,
                         port: int, timeout: float = 60.0) -> None:
    """Run ``here`` (rank 0) in this process while ranks 1 .. ``processes`` - 1 run
    ``other_rank(index, port)`` in spawned processes (``index`` from 0). A failure here stops the
    others (they may wait in a collective this process left); a failure there is raised here
    (torch's ``ProcessRaisedException``); ranks still running after ``timeout`` seconds fail the check."""
    started = mp.start_processes(other_rank, args=(port,), nprocs=processes - 1, join=False, start_method="spawn")
    try:
        here()
    except BaseException:
        for p in started.processes:
            if p.is_alive():
                p.terminate()
        raise
    deadline = time.monotonic() + timeout
    while not started.join(timeout=max(0.0, deadline - time.monotonic())):  # True once all have ended well
        if time.monotonic() >= deadline:
            for p in started.processes:
                p.terminate()
            raise AssertionError(f"ranks 1 to {processes - 1} did not finish within {timeout:.0f} s")
