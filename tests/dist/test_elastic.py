"""Elastic resume across process counts (issue 22, item 6): a run checkpointed on 2 processes
resumes on 1, and one checkpointed on 1 resumes on 2; the rest of the epoch trains on exactly the
samples the interrupted run had not trained on, none twice, as an uninterrupted run would cover
them (``elastic_worker.py``, the real trainer and loader with 2 workers per process, gloo)."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from .launch import torchrun

HERE = Path(__file__).parent
SHARDS = "train-{000000..000002}.tar"  # 3 shards: on 2 processes x 2 workers, the remainder shard is shared by 4 slots
BATCH, WORKERS = 8, 2


def launch(tmp: Path, name: str, nproc: int, steps: int, save_every: int, digits_dir: Path,
           resume: Path | None = None) -> dict:
    out = tmp / f"{name}.json"
    torchrun(HERE / "elastic_worker.py", str(out), str(tmp / name), f"{digits_dir}/{SHARDS}", str(steps),
             str(save_every), *([str(resume)] if resume else []), nproc=nproc, timeout=240)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]
    return {"keys": [r["keys"] for r in ranks], "printed": ranks[0]["printed"]}


def epoch_keys(run: dict, epoch: int) -> list[str]:
    """The keys every process trained on in ``epoch``."""
    return [k for log in run["keys"] for e, k in log if e == epoch]


@pytest.fixture(scope="module")
def every(digits_dir: Path) -> set[str]:
    keys = set()
    for i in range(3):
        with tarfile.open(digits_dir / f"train-{i:06d}.tar") as tar:
            keys |= {m.name.split(".")[0] for m in tar.getmembers()}
    return keys


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_elastic_resume_covers_the_rest_of_the_epoch(before: int, after: int, digits_dir: Path, every: set[str],
                                                     tmp_path: Path) -> None:
    """Interrupted at step 12 of epoch 0 on ``before`` processes, resumed on ``after`` until the
    next epoch has begun: the samples trained in epoch 0 by both runs are all the epoch's samples,
    each once, less at most one partial batch per worker stream (which an uninterrupted run drops
    as well: compared with the uninterrupted run on ``before`` processes)."""
    steps = 12
    whole = launch(tmp_path, "whole", before, -(-len(every) // (BATCH * before)) + 2, steps, digits_dir)
    trained = [k for log in whole["keys"] for _, k in log[:steps * BATCH]]  # the first 12 steps, checkpointed
    assert len(trained) == steps * BATCH * before and set(trained) <= set(epoch_keys(whole, 0))
    per_step = BATCH * after
    rest = -(-(len(every) - len(trained)) // per_step) + 4  # a few steps into epoch 1
    resumed = launch(tmp_path, "resumed", after, steps + rest, 0, digits_dir,
                     resume=tmp_path / "whole" / "checkpoints" / f"step_{steps:08d}")
    assert f"without the {len(trained)} samples already trained" in resumed["printed"], resumed["printed"]
    both = trained + epoch_keys(resumed, 0)
    assert max(Counter(both).values()) == 1 and set(both) <= every
    assert len(every) - len(both) < BATCH * WORKERS * after
    assert epoch_keys(resumed, 1)  # epoch 1 began
    uninterrupted = epoch_keys(whole, 0)
    assert len(set(uninterrupted) ^ set(both)) < BATCH * WORKERS * (before + after)  # only dropped tails differ
