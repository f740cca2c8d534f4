"""What checksums cost: load of a base- and a large-size audio checkpoint with and without SHA-256 verification.

    python -m benchmarks.integrity [--sizes base large] [--repeats 3] [--dir /tmp/integrity-bench] [--json out.json]

Random weights (numpy, no init) are saved with `flax_data2vec.save`, which records every file's SHA-256 in the
marker; then `checkpoint.restore` is timed with `verify=True` (the default of `fd.load`) and `verify=False`,
alternating, plus the hashing alone. Files are in the page cache after the first read (the warm case a pod
sees after its first load); `--drop-caches` (root) measures cold reads too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time

import jax
import numpy as np

from flax_data2vec import Data2VecAudioConfig, Data2VecAudioModel, checkpoint, registry
from flax_data2vec.integrity import check_listed_files

SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def random_checkpoint(directory: str, size: str) -> tuple[str, int]:
    """A Data2VecAudioModel checkpoint of `size` with random float32 weights; returns (path, parameter count)."""
    module = Data2VecAudioModel(Data2VecAudioConfig(**SIZES[size]))
    shapes = registry.abstract_params(module)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, shapes)
    count = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    path = os.path.join(directory, size)
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    checkpoint.save(path, module, params)
    print(f"{size}: {count / 1e6:.1f}M params, saved in {time.perf_counter() - t0:.2f} s (hashing included)")
    return path, count


def timed(fn) -> float:
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def measure(path: str, files: dict, repeats: int, cold: bool) -> dict[str, list[float]]:
    """Restore times with and without verification (alternating), and the hashing alone."""
    def restore(verify: bool) -> float:
        return timed(lambda: checkpoint.restore(path, verify=verify)[1])
    restore(True)  # warm: page cache, imports, jit of the finiteness check
    times = {"verify": [], "no verify": [], "hash only": []}
    for i in range(repeats):
        for name in (["verify", "no verify"] if i % 2 == 0 else ["no verify", "verify"]):
            times[name].append(restore(name == "verify"))
        times["hash only"].append(timed(lambda: check_listed_files(path, files, checkpoint.MARKER)))
    if cold:
        for name in ("verify", "no verify"):
            drop_caches()
            times[f"{name} (cold)"] = [restore(name == "verify")]
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["base", "large"], choices=sorted(SIZES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="/tmp/flax_data2vec-integrity-bench")
    p.add_argument("--drop-caches", action="store_true", help="also time cold reads (needs root)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    os.makedirs(args.dir, exist_ok=True)
    results = {}
    for size in args.sizes:
        path, count = random_checkpoint(args.dir, size)
        info = checkpoint.read_metadata(path)
        nbytes = sum(f["size"] for f in info["files"].values())
        times = measure(path, info["files"], args.repeats, args.drop_caches)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[size] = {"params": count, "bytes": nbytes, "median_s": med, "times_s": times}
        print(f"{size}: {nbytes / 2**20:.0f} MiB on disk; restore median {med['verify']:.2f} s with SHA-256 "
              f"verification, {med['no verify']:.2f} s without (+{med['verify'] - med['no verify']:.2f} s, "
              f"{100 * (med['verify'] / med['no verify'] - 1):.0f}%); hashing alone {med['hash only']:.2f} s "
              f"({nbytes / 2**20 / med['hash only']:.0f} MiB/s)")
        for k in ("verify (cold)", "no verify (cold)"):
            if k in med:
                print(f"{size}: {k}: {med[k]:.2f} s")
        shutil.rmtree(path, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "cpu_count": os.cpu_count()}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
