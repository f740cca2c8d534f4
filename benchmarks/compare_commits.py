"""One benchmark module run against two checkouts of the package, interleaved (A B A B ...), medians per tree.

    python -m benchmarks.compare_commits --before /path/to/old/worktree --rounds 2 -- --only text --layers 2

Each round runs `python -m benchmarks.<module> ARGS` once per tree in a fresh process, the trees' order
alternating between rounds, so a change in machine load hits both alike. Both runs use the same harness, this
checkout's `benchmarks/` (copied to a temp dir that is the working directory), and differ only in the
`flax_data2vec` they import: the tree's, put first on PYTHONPATH and checked. Reported per row: each tree's
median over rounds of the module's own median, and before / after (> 1: the `--after` tree is faster); each
run's PyTorch row is kept too, as a same-process yardstick of the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(tree: str, harness: str, module: str, args: list[str]) -> dict:
    """The module's JSON report for one run of `harness` (a folder holding benchmarks/) on `tree`'s package."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        package = os.path.join(tree, "flax_data2vec") + os.sep
        code = (f"import runpy, sys, flax_data2vec; assert flax_data2vec.__file__.startswith({package!r}), "
                f"flax_data2vec.__file__; sys.argv[0] = {module!r}; "
                f"runpy.run_module('benchmarks.{module}', run_name='__main__')")
        subprocess.run([sys.executable, "-c", code, *args, "--json", out], cwd=harness,
                       env={**os.environ, "PYTHONPATH": tree}, check=True)
        with open(out) as f:
            return json.load(f)


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
    for name, path in trees.items():
        if not os.path.isfile(os.path.join(path, "flax_data2vec", "__init__.py")):
            raise SystemExit(f"--{name} {path} holds no flax_data2vec package")
    commits = {name: subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() for name, path in trees.items()}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as harness:
        shutil.copytree(os.path.join(HERE, "benchmarks"), os.path.join(harness, "benchmarks"),
                        ignore=shutil.ignore_patterns("results", "__pycache__"))
        for r in range(a.rounds):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for name in order:
                print(f"round {r + 1}/{a.rounds}: {name} ({commits[name]}, {trees[name]})", flush=True)
                runs[name].append(run_once(trees[name], harness, a.module, a.args))
    rows = summarise(runs)
    print(f"\n{'workload':<70} {'impl':<42} {'before':>9} {'after':>9} {'before/after':>12}")
    for row in rows:
        print(f"{row['workload']:<70} {row['impl']:<42} {row['before_median_ms']:>9.0f} "
              f"{row['after_median_ms']:>9.0f} {row['before_over_after']:>12.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"commits": commits, "trees": trees, "module": a.module, "args": a.args, "rounds": a.rounds,
                       "harness": os.path.join(HERE, "benchmarks"), "summary": rows, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
