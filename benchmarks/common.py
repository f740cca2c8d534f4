"""Shared benchmark plumbing: machine info, interleaved timing, jit compile timing, ratio tables.

Every benchmark here runs transformers (PyTorch) and flax_data2vec in the same process, alternating
the two on each repeat so that slow drift (thermal, noisy neighbours) hits both equally. Times are
wall-clock per call with the device synchronised (`jax.block_until_ready`, `torch.cuda.synchronize`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np

# Environment variables that change CPU/GPU kernels or thread counts; reported as found, never set here.
ENV_VARS = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NVPL_BLAS_DEBUG_CPU_TYPE",
            "MKL_DEBUG_CPU_TYPE", "TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE",
            "XLA_PYTHON_CLIENT_MEM_FRACTION")


CONTENTION_RETRIES = 3  # set from --retries by setup()


# ---------------------------------------------------------------------------------------------------------------
# command line
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: float32 only; gpu: also bf16 and cuDNN attention variants")
    p.add_argument("--only", choices=("audio", "text"), default=None, help="run one modality only")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 1 repeat: a smoke test, not a measurement")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (after the warm-ups)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per variant after compilation")
    p.add_argument("--json", default=None, help="also write the table and machine info to this JSON path")
    p.add_argument("--retries", type=int, default=3,
                   help="repeats of a timed call during which other processes were busy (0 on a loaded machine)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for the 1-min load average to fall below 0.5")
    return p


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Apply --quick/--device, wait for a quiet machine if asked, and return (and print) the machine info."""
    import jax
    import torch
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 1), min(args.warmup, 1)
    global CONTENTION_RETRIES
    CONTENTION_RETRIES = args.retries
    if args.device == "gpu":
        if jax.default_backend() != "gpu" or not torch.cuda.is_available():
            raise SystemExit("--device gpu needs a CUDA build of both jax and torch")
        # JAX's default float32 matmul precision on GPU is TF32; give torch the same.
        torch.set_float32_matmul_precision("high")
    else:
        jax.config.update("jax_platforms", "cpu")
    if args.wait_quiet:
        wait_for_quiet(0.5, args.wait_quiet)
    info = machine_info("cuda" if args.device == "gpu" else "cpu")
    print_machine_info(info)
    return info


# ---------------------------------------------------------------------------------------------------------------
# machine info
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(name: str) -> str:
    try:
        import importlib.metadata as md
        return md.version(name)
    except Exception:  # noqa: BLE001
        return "-"


def load_average() -> tuple[float, float, float] | None:
    """1/5/15-minute load averages: other processes on the same cores make every number here meaningless."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def wait_for_quiet(max_load: float, timeout_s: float) -> float | None:
    """Wait (up to `timeout_s`) until the 1-minute load average is below `max_load`; return it."""
    t0 = time.time()
    while True:
        load = load_average()
        if load is None or load[0] < max_load or time.time() - t0 > timeout_s:
            return None if load is None else load[0]
        print(f"# waiting for a quiet machine: load average {load[0]:.2f} >= {max_load}", flush=True)
        time.sleep(15)


def machine_info(torch_device: str = "cpu") -> dict[str, Any]:
    """CPU/GPU, core count, library versions, thread settings and kernel-relevant env vars."""
    import jax
    import torch
    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_gib": _mem_gib(),
        "python": platform.python_version(),
        "jax": jax.__version__, "jaxlib": _version("jaxlib"), "flax": _version("flax"), "optax": _version("optax"),
        "torch": torch.__version__, "transformers": _version("transformers"), "numpy": np.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in ENV_VARS if os.environ.get(k) is not None},
        "load_average_at_start": load_average(),
    }
    if torch_device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def print_machine_info(info: dict[str, Any]) -> None:
    print(f"# {info['date']}  {info['cpu']}  ({info['cores_visible']} cores visible, {info['mem_gib']} GiB)"
          + (f"  GPU: {info['gpu']}" if "gpu" in info else ""))
    print(f"# jax {info['jax']} (jaxlib {info['jaxlib']}, backend {info['jax_backend']}), flax {info['flax']}, "
          f"optax {info['optax']}, torch {info['torch']}, transformers {info['transformers']}")
    print(f"# torch threads {info['torch_threads']} (interop {info['torch_interop_threads']}); "
          f"env: {info['env'] or 'none of ' + ', '.join(ENV_VARS[:6]) + ', ... set'}")
    load = info.get("load_average_at_start")
    if load:
        print(f"# load average at start (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
              + ("  -- WARNING: other processes share these cores" if load[0] > 0.5 * info['cores_visible'] else ""))


# ---------------------------------------------------------------------------------------------------------------
# timing
@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of each timed call of one variant, plus its compile time (jax only)."""

    name: str
    times: list[float] = dataclasses.field(default_factory=list)
    compile_s: float | None = None
    foreign: list = dataclasses.field(default_factory=list)  # other processes' cores in use, per call
    contended: int = 0  # timed calls kept although other processes were busy (after all retries)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> float:
        if len(self.times) < 2:
            return 0.0
        q1, q3 = np.percentile(self.times, [25, 75])
        return float(q3 - q1)


def jax_sync(x: Any) -> Any:
    import jax
    return jax.block_until_ready(x)


def torch_sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _timed_call(fn: Callable[[], Any]) -> tuple[float, float | None]:
    """(wall seconds, CPU-seconds per wall-second that *other* processes used meanwhile)."""
    busy0, own0 = _busy_cpu_seconds(), _own_cpu_seconds()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    busy1, own1 = _busy_cpu_seconds(), _own_cpu_seconds()
    if busy0 is None or busy1 is None:
        return wall, None
    return wall, max(0.0, (busy1 - busy0) - (own1 - own0)) / wall


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     compile_s: dict[str, float] | None = None, verbose: bool = True,
                     max_foreign: float = 0.15, retries: int | None = None) -> dict[str, Timing]:
    """Run every fn `warmup` times, then `repeats` rounds of all fns in rotating order; each fn must sync.

    Alternating runs (A B, B A, ...) keep slow drift from favouring one side. A timed call during which
    other processes used more than `max_foreign` of a core (from /proc/stat) is repeated, up to
    `retries` times (default: --retries); the last try is kept and counted in `Timing.contended`.
    """
    retries = CONTENTION_RETRIES if retries is None else retries
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {n: Timing(n, compile_s=(compile_s or {}).get(n)) for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            for attempt in range(retries + 1):
                wall, foreign = _timed_call(fns[n])
                if foreign is None or wall < 0.2 or foreign <= max_foreign:  # /proc/stat ticks are 10 ms
                    break
                print(f"  ({n}: other processes used {foreign:.2f} cores during the call; "
                      f"{'retrying' if attempt < retries else 'keeping it'})", flush=True)
            else:
                out[n].contended += 1
            out[n].times.append(wall)
            out[n].foreign.append(foreign)
        if verbose:
            print("  round", r + 1, " ".join(f"{n}={out[n].times[-1] * 1e3:.1f}ms" for n in names), flush=True)
    return out


def compile_jit(jitted, *args, **kwargs) -> tuple[Any, float]:
    """AOT-compile a `jax.jit` function for these args: (compiled callable, trace+lower+compile seconds)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t0


def xla_flops(compiled) -> float | None:
    """FLOPs XLA's cost analysis assigns to a compiled program (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001
        return None


def matmul_peak(device: str = "cpu", n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Achieved float32 GFLOP/s of one n^3 matmul in torch and in jax (the practical ceiling here)."""
    import jax
    import jax.numpy as jnp
    import torch
    tdev = "cuda" if device == "gpu" else "cpu"
    a = torch.randn(n, n, device=tdev)
    b = torch.randn(n, n, device=tdev)
    ja = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    mm = jax.jit(jnp.matmul)
    fns = {"torch": lambda: (a @ b, torch_sync(tdev)), "jax": lambda: jax_sync(mm(ja, ja))}
    t = time_interleaved(fns, 1, repeats, verbose=False)
    return {k: 2 * n**3 / v.median / 1e9 for k, v in t.items()}


# ---------------------------------------------------------------------------------------------------------------
# tables
@dataclasses.dataclass
class Row:
    """One line of a ratio table. `work` = units processed per call (tokens, audio seconds) for throughput."""

    workload: str
    impl: str
    timing: Timing
    work: float | None = None
    unit: str = ""
    baseline: str | None = None  # impl name of the row this one is compared to (same workload)
    flops: float | None = None   # per call, for achieved GFLOP/s
    note: str = ""

    def as_dict(self, table: list["Row"]) -> dict[str, Any]:
        base = self.baseline_row(table)
        return {
            "workload": self.workload, "impl": self.impl, "median_ms": self.timing.median * 1e3,
            "iqr_ms": self.timing.iqr * 1e3, "times_ms": [t * 1e3 for t in self.timing.times],
            "compile_s": self.timing.compile_s, "throughput": self.throughput, "unit": self.unit,
            "foreign_cores": self.timing.foreign, "contended_calls": self.timing.contended,
            "speedup_vs_baseline": (base.timing.median / self.timing.median) if base else None,
            "baseline": self.baseline, "gflops_per_call": self.flops / 1e9 if self.flops else None,
            "achieved_gflop_s": self.flops / self.timing.median / 1e9 if self.flops else None, "note": self.note,
        }

    @property
    def throughput(self) -> float | None:
        return self.work / self.timing.median if self.work else None

    def baseline_row(self, table: list["Row"]) -> "Row | None":
        for r in table:
            if self.baseline and r.workload == self.workload and r.impl == self.baseline:
                return r
        return None


def markdown_table(rows: list[Row]) -> str:
    head = ("| workload | implementation | median ms | IQR ms | throughput | speed-up vs torch | compile s "
            "| GFLOP/s (XLA count) |\n|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        d = r.as_dict(rows)
        tp = f"{d['throughput']:,.1f} {r.unit}/s" if d["throughput"] else "-"
        sp = f"{d['speedup_vs_baseline']:.2f}x" if d["speedup_vs_baseline"] else ("1.00x" if r.baseline is None
                                                                              and "torch" in r.impl else "-")
        cs = f"{d['compile_s']:.1f}" if d["compile_s"] is not None else "-"
        gf = f"{d['achieved_gflop_s']:.0f}" if d["achieved_gflop_s"] else "-"
        impl = r.impl + (f" ({r.note})" if r.note else "") + (
            f" [{r.timing.contended}/{len(r.timing.times)} runs contended]" if r.timing.contended else "")
        lines.append(f"| {r.workload} | {impl} | {d['median_ms']:,.1f} | {d['iqr_ms']:.1f} | {tp} | {sp} | {cs} "
                     f"| {gf} |")
    return "\n".join(lines)


def report(rows: list[Row], info: dict[str, Any], args: argparse.Namespace, extra: dict | None = None) -> None:
    """Print the markdown table; write table + machine info + args as JSON if `--json` was given."""
    info["load_average_at_end"] = load_average()
    print()
    print_machine_info(info)
    print(f"# load average at end: {' '.join(f'{x:.2f}' for x in info['load_average_at_end'] or ())}")
    if extra:
        for k, v in extra.items():
            print(f"# {k}: {v}")
    print(markdown_table(rows))
    if args.json:
        payload = {"machine": info, "args": vars(args), "extra": extra or {},
                   "rows": [r.as_dict(rows) for r in rows], "markdown": markdown_table(rows)}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        print(f"# wrote {args.json}")
