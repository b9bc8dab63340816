"""Mutation score from ``mutmut results --all true`` (written by ``make mutation``).

Prints the counts by outcome, the score (killed or timed out, over every mutant: a mutant no test
covers counts as survived), and the surviving mutants by file, for docs/testing.md.

    python -m benchmarks.mutation_score mutation-results.txt
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

CAUGHT = {"killed", "timeout"}  # a mutant that hangs the tests is detected by the time-out


def parse(text: str) -> dict[str, str]:
    """Mutant name -> outcome, from ``mutmut results --all true`` lines ``name: outcome``."""
    out = {}
    for line in text.splitlines():
        name, sep, outcome = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            out[name] = outcome
    return out


def main(path: str) -> int:
    results = parse(Path(path).read_text())
    if not results:
        print(f"{path}: no mutant results (did `mutmut run` run?)")
        return 1
    counts = Counter(results.values())
    caught = sum(counts[c] for c in CAUGHT)
    print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print(f"mutation score: {caught}/{len(results)} = {100 * caught / len(results):.1f} % "
          "(killed or timed out; mutants no test covers count as survivors)")
    left: dict[str, list[str]] = defaultdict(list)
    for name, outcome in sorted(results.items()):
        if outcome not in CAUGHT:
            module, _, mutant = name.rpartition(".")
            left[module].append(f"{mutant} ({outcome})")
    for module, mutants in left.items():
        print(f"{module}: {len(mutants)} not caught: {', '.join(mutants[:12])}{' ...' if len(mutants) > 12 else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
