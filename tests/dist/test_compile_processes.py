"""``train.compile: true`` in 2 gloo processes with an objective that has trained heads, so that the
objective is compiled and DDP-wrapped too (``trainer_worker.py``'s ``<case>_compiled`` against
``<case>_eager``, the same recipe and batches uncompiled): NNCLR (a predictor; its predictions gathered
with gradient, an autograd function with an all-gather in its forward and an all-reduce in its
backward, which dynamo traces into the graph as functional collectives; the support set gathered
without) and CLIP with the gradient cache (the kept chunk's backward outside DDP's synchronising one,
the re-run chunk's under ``no_sync``). Each trains as uncompiled to float round-off, and compiles nothing
new once its first steps are past. (The worker has the cases of SwAV (prototypes frozen for 2 steps;
Sinkhorn's all-reduces), DINO, BYOL, SimSiam and MoCo v3 too, all checked so on 2026-11-29; left out of
``make test`` for its time.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .launch import torchrun
from .test_training_steps import TOL, max_diff

HERE = Path(__file__).parent


# a gather with gradient inside the graph; the gradient cache under DDP (SwAV's case: in the worker)
@pytest.mark.parametrize("name", ["nnclr", "clip_grad_cache"])
def test_a_compiled_objective_with_heads_trains_as_uncompiled_in_two_processes(digits_dir: Path, tmp_path: Path,
                                                                               name: str) -> None:
    torchrun(HERE / "trainer_worker.py", str(tmp_path / "out.pt"), str(tmp_path / "runs"),
             f"{digits_dir}/train-{{000000..000004}}.tar", f"{name}_eager", f"{name}_compiled", timeout=300)
    found = torch.load(tmp_path / "out.pt")
    eager, compiled = found[f"{name}_eager"], found[f"{name}_compiled"]
    assert "error" not in eager and "error" not in compiled, (eager.get("error"), compiled.get("error"))
    assert list(compiled["losses"]) == list(eager["losses"]) == list(range(1, 7))
    for step, loss in eager["losses"].items():
        assert compiled["losses"][step] == pytest.approx(loss, abs=TOL), (step, eager["losses"], compiled["losses"])
    for part in ("model", "objective"):
        diff, where = max_diff(eager[part], compiled[part])
        assert diff < TOL, (part, where, diff)
    assert max_diff(eager["start"], eager["model"])[0] > 100 * TOL
    # graphs compiled by the end of each step: the first steps compile (DINO's and SwAV's also when a
    # frozen layer starts training), the last 4 nothing new (a value that changes every step read
    # inside a graph would recompile each time, and after 8 torch would run that code uncompiled)
    graphs = compiled["graphs"]
    assert len(graphs) == 6 and graphs[0] >= 2 and graphs[2:] == [graphs[-1]] * 4, graphs
