"""One benchmark module run against two checkouts of the package, interleaved (A B A B ...), medians per tree.

    python -m benchmarks.compare_commits --before /path/to/old/worktree --rounds 2 -- --only text

Each round runs `python -m benchmarks.<module> ARGS` once per tree in a fresh process whose `flax_data2vec`
is that tree's (PYTHONPATH and working directory), the trees' order alternating between rounds, so a change
in machine load hits both alike. Each tree runs its own copy of the benchmark; the report says whether the
copies differ (they should not, for a fair comparison).
Reported per row: each tree's median over rounds of the module's own median, and the ratio before / after
(> 1: the current tree is faster); each run's own PyTorch row is kept too, as a same-process yardstick.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(tree: str, module: str, args: list[str]) -> dict:
    """The module's JSON report for one run in `tree` (its package checked to be the one imported)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        code = (f"import runpy, sys, flax_data2vec; assert flax_data2vec.__file__.startswith({tree!r}), "
                f"flax_data2vec.__file__; sys.argv[0] = {module!r}; "
                f"runpy.run_module('benchmarks.{module}', run_name='__main__')")
        subprocess.run([sys.executable, "-c", code, *args, "--json", out], cwd=tree,
                       env={**os.environ, "PYTHONPATH": tree}, check=True)
        with open(out) as f:
            return json.load(f)


def benchmark_sources(trees: dict[str, str], module: str) -> list[str]:
    """The benchmark's own files (module, common, models) that differ between the trees."""
    def read(tree, name):
        path = os.path.join(tree, "benchmarks", name)
        return open(path).read() if os.path.exists(path) else None
    names = (f"{module}.py", "common.py", "models.py")
    return [n for n in names if len({read(t, n) for t in trees.values()}) > 1]


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per (workload, impl): each tree's median of medians, and before / after."""
    table: dict[tuple, dict] = {}
    for tree, reports in runs.items():
        for report in reports:
            for row in report["rows"]:
                key = (row["workload"], row["impl"])
                table.setdefault(key, {"workload": key[0], "impl": key[1]}).setdefault(tree, []).append(
                    row["median_ms"])
    rows = []
    for entry in table.values():
        for tree in runs:
            entry[f"{tree}_median_ms"] = statistics.median(entry.get(tree, [float("nan")]))
        entry["before_over_after"] = entry["before_median_ms"] / entry["after_median_ms"]
        rows.append(entry)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="checkout of the older commit (a git worktree)")
    parser.add_argument("--after", default=HERE, help="checkout of the newer commit (default: this one)")
    parser.add_argument("--module", default="train_step", help="benchmarks.<module> to run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per tree, alternating")
    parser.add_argument("--json", default=None, help="write every run and the summary here")
    parser.add_argument("args", nargs="*", help="arguments for the benchmark module (after --)")
    a = parser.parse_args(argv)
    trees = {"before": os.path.abspath(a.before), "after": os.path.abspath(a.after)}
    commits = {name: subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() for name, path in trees.items()}
    differ = benchmark_sources(trees, a.module)
    if differ:
        print(f"warning: the trees' benchmark files differ: {', '.join(differ)}", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(a.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for name in order:
            print(f"round {r + 1}/{a.rounds}: {name} ({commits[name]}, {trees[name]})", flush=True)
            runs[name].append(run_once(trees[name], a.module, a.args))
    rows = summarise(runs)
    print(f"\n{'workload':<62} {'impl':<42} {'before':>9} {'after':>9} {'before/after':>12}")
    for row in rows:
        print(f"{row['workload']:<62} {row['impl']:<42} {row['before_median_ms']:>9.0f} "
              f"{row['after_median_ms']:>9.0f} {row['before_over_after']:>12.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"commits": commits, "trees": trees, "module": a.module, "args": a.args, "rounds": a.rounds,
                       "benchmark_files_differ": differ, "summary": rows, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
