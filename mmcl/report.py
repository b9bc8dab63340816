"""A run's report: every logged quantity against steps as pictures, and one Markdown page.

``mmcl report RUN`` (and the trainer, when a run ends) reads ``RUN/metrics.jsonl`` and
``RUN/summary.json`` and writes ``RUN/report/``: ``curves.png`` (loss, learning rate, throughput,
the loader's share of the time, and every other training metric, one panel each), a PNG per
evaluation metric logged during training, and ``report.md`` with the final figures. The model
card shows ``curves.png`` too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmcl.files import png, write_atomic

FIRST = ("loss", "lr", "samples_per_s", "data_wait")  # the panels every run has, in this order
TITLES = {"loss": "training loss", "lr": "learning rate", "samples_per_s": "samples / s (all processes)",
          "data_wait": "share of time waiting for data", "grad_norm": "gradient norm (before clipping)",
          "gpu_mem_gb": "peak GPU memory (GiB)", "bad_steps": "skipped non-finite steps (total)",
          "acc_i2t": "in-batch accuracy, image to text", "acc_t2i": "in-batch accuracy, text to image",
          "logit_scale": "logit scale (1 / temperature)", "logit_bias": "logit bias"}


def log_lines(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """Each line of a ``metrics.jsonl`` with its record, or ``None`` for a line torn by the kill that
    interrupted the run (the one reader of the log: reports, and the trainer trimming it on resume).

    >>> import tempfile; log = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> _ = log.write_text('{"step": 1, "loss": 2.5}\\n{"step": 2, "lo')
    >>> log_lines(log)
    [('{"step": 1, "loss": 2.5}', {'step': 1, 'loss': 2.5}), ('{"step": 2, "lo', None)]
    """
    out: list[tuple[str, dict[str, Any] | None]] = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            out.append((line, None))
    return out


def read_log(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training records (those with a loss) and the evaluation records of ``RUN/metrics.jsonl``,
    each step once (the last record of a step wins, as after a resume); a torn line is skipped."""
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for _, record in log_lines(run / "metrics.jsonl"):
        if record is None:
            continue
        if "loss" in record:
            train[record["step"]] = record
        elif any("/" in k for k in record):
            evals.setdefault(record["step"], {}).update(record)
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Every numeric quantity of ``records`` as (steps, values), leaving out the step and epoch."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for k, v in r.items():
            if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                steps, values = out.setdefault(k, ([], []))
                steps.append(r["step"])
                values.append(v)
    return out


def plot_curves(records: list[dict[str, Any]], file: Path, title: str) -> list[str]:
    """One panel per quantity of the training records, saved as ``file``; returns the quantities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in _series(records).items() if k in FIRST or any(v[1])}  # no all-zero panels
    names = [k for k in FIRST if k in series] + sorted(k for k in series if k not in FIRST)
    if not names:
        return []
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = series[name]
        ax.plot(steps, values, marker="." if len(steps) < 40 else None, linewidth=1.2)
        ax.set_title(TITLES.get(name, name), fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(file, png(fig, dpi=90))
    plt.close(fig)
    return names


def write_report(run: str | Path, results: list[dict[str, Any]] | None = None) -> Path:
    """Write ``RUN/report/`` (``curves.png``, ``evals.png`` when evaluations were logged during the
    run, ``report.md``) from the run's logs and its final evaluation ``results`` (default: those of
    ``RUN/summary.json``); returns the Markdown page.

    >>> import json, pathlib, tempfile
    >>> run = pathlib.Path(tempfile.mkdtemp())   # what a run logs, one JSON record per logging step
    >>> records = [{"step": s, "loss": 4 / s, "lr": 1e-3 * s, "samples_per_s": 900.0} for s in range(1, 6)]
    >>> _ = (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
    >>> page = write_report(run)
    >>> page.name, sorted(p.name for p in page.parent.iterdir())
    ('report.md', ['curves.png', 'report.md'])
    """
    run = Path(run)
    train, evals = read_log(run)
    if not train:
        from mmcl.errors import MmclError

        raise MmclError(f"{run} has no training records in metrics.jsonl: nothing to report")
    out = run / "report"
    names = plot_curves(train, out / "curves.png", f"{run.name}: training")
    lines = [f"# {run.name}", "", f"{len(train)} logged steps, to step {train[-1]['step']}.", "",
             "![training curves](curves.png)", ""]
    if len(evals) > 1:  # evaluations during the run: their own curves
        plot_curves(evals, out / "evals.png", f"{run.name}: evaluations during training")
        lines += ["![evaluations during training](evals.png)", ""]
    last = train[-1]
    lines += ["## Last logged step", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {TITLES.get(k, k)} | {last[k]:.6g} |" for k in names if isinstance(last.get(k), (int, float))]
    summary = run / "summary.json"
    if results is None:
        results = (json.loads(summary.read_text()).get("eval") or []) if summary.is_file() else []
    if results:
        lines += ["", "## Final evaluation", "", "| task | dataset | metric | value |", "|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['dataset']['name']} | {k} | {v:.4f} |"
                  for r in results for k, v in r["metrics"].items()]
    skipped = last.get("skipped") or {}
    if skipped:
        lines += ["", "## Skipped samples", "", *[f"- {k}: {v}" for k, v in sorted(skipped.items())]]
    page = out / "report.md"
    write_atomic(page, "\n".join(lines) + "\n")
    return page
