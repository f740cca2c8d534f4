"""data2vec v1 vs 2.0 pre-training at equal compute on the shipped speech, then the same CTC fine-tune from each.

Budget: process CPU seconds of the pre-training steps (user + system of this process, all its threads,
compiles left out), which stays fair on a machine shared with other jobs where wall-clock time does not.
2.0 runs `--v2-steps` updates first; its measured CPU seconds per update times that count is the budget; v1's
CPU seconds per update are measured in a short calibration run, and v1 gets budget / that many updates. Each
run uses its task's defaults (shipped data, batch 8, the recipe's schedule sized to its own step count).
Then `--task ctc` fine-tunes, with identical settings, from the v1 model, the 2.0 model, and from scratch for
both architectures (the v1 tiny preset, and the untrained 2.0 student's encoder), logging eval CER.

    python -m benchmarks.pretrain_quality [--quick] [--v2-steps 60] [--ft-steps 200] [--out DIR] [--figure PNG]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from flax_data2vec.train.config import TrainConfig
from flax_data2vec.train.loop import Trainer, train

FT = dict(learning_rate=1e-3, schedule="tri_stage", tri_stage_ratios=(0.1, 0.7, 0.2),  # the from-scratch recipe
          freeze_feature_encoder=False)  # the same for every start
NO_SPEC_AUGMENT = dict(mask_time_prob=0.0)  # v1 heads only: 2.0 has no SpecAugment (and no such config field)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuLog:
    """on_log callback: each metrics.jsonl row with the process CPU seconds at the moment it was written."""

    def __init__(self):
        self.rows, self.start = [], cpu_seconds()

    def __call__(self, row: dict) -> None:
        self.rows.append({**row, "cpu_s": cpu_seconds() - self.start})

    def per_step(self) -> float:
        """Median CPU seconds per update over the logged intervals, leaving out those holding a compile."""
        rows = [r for r in self.rows if "loss" in r]
        deltas = [(b["cpu_s"] - a["cpu_s"]) / (b["step"] - a["step"]) for a, b in zip(rows, rows[1:])]
        if not deltas:
            raise RuntimeError("need at least 3 training log lines to measure the cost of a step")
        low = min(deltas)
        return statistics.median([d for d in deltas if d <= 2 * low])  # an interval with a compile costs far more


def run(cfg: TrainConfig) -> CpuLog:
    """Train (or resume: the trainer continues from the output directory's checkpoint) and log CPU seconds."""
    log = CpuLog()
    t0 = time.time()
    train(cfg, on_log=log)
    print(f"# {cfg.task} {cfg.model} -> {cfg.output_dir}: {cfg.max_steps} steps, "
          f"{cpu_seconds() - log.start:.0f} CPU s, {time.time() - t0:.0f} s wall", flush=True)
    return log


def pretrain_config(task: str, steps: int, out: str, log_every: int, args) -> TrainConfig:
    return TrainConfig(task=task, model="tiny", max_steps=steps, log_every=log_every, eval_every=steps,
                       save_every=steps, keep_checkpoints=1, output_dir=out, progress=False, seed=args.seed)


def pretrain(args, out: str) -> dict:
    """2.0 for --v2-steps, v1 calibrated then run for the same CPU seconds; returns the record."""
    record_path = os.path.join(out, "pretrain.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            return json.load(f)
    v2 = run(pretrain_config("pretrain2-audio", args.v2_steps, os.path.join(out, "pretrain2"), args.log_every, args))
    cost2 = v2.per_step()
    budget = cost2 * args.v2_steps
    calib = run(pretrain_config("pretrain-audio", args.calibration_steps, os.path.join(out, "calibrate_v1"),
                                max(1, args.calibration_steps // 6), args))
    cost1 = calib.per_step()
    v1_steps = max(1, round(budget / cost1))
    v1 = run(pretrain_config("pretrain-audio", v1_steps, os.path.join(out, "pretrain1"), args.log_every, args))
    record = {"budget_cpu_s": budget, "v2": {"steps": args.v2_steps, "cpu_s_per_step": cost2, "log": v2.rows},
              "v1": {"steps": v1_steps, "cpu_s_per_step_calibration": cost1, "cpu_s_per_step": v1.per_step(),
                     "log": v1.rows}}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def untrained_v2(out: str, args) -> str:
    """The 2.0 student's encoder at initialisation, exported as a model directory (no step taken)."""
    directory = os.path.join(out, "scratch2")
    if not os.path.isdir(os.path.join(directory, "model")):
        Trainer(pretrain_config("pretrain2-audio", 10, directory, 1, args)).export()  # a schedule needs > 1 step
    return os.path.join(directory, "model")


def fine_tune(args, out: str, starts: dict[str, str]) -> dict[str, list[dict]]:
    """name -> eval rows (step, eval_cer, eval_wer, eval_loss) of one identical CTC run per start."""
    curves = {}
    for name, model in starts.items():
        directory = os.path.join(out, "ctc_" + name.split()[0])
        cfg = TrainConfig(task="ctc", model=model, max_steps=args.ft_steps, eval_every=args.ft_eval_every,
                          log_every=args.ft_eval_every, save_every=args.ft_steps, keep_checkpoints=1,
                          output_dir=directory, progress=False, seed=args.seed, n_buckets=1, **FT,
                          **({} if name.startswith("2.0") else NO_SPEC_AUGMENT))
        done = os.path.join(directory, "model")
        log = CpuLog() if os.path.isdir(done) else run(cfg)
        rows = log.rows or [json.loads(line) for line in open(os.path.join(directory, "metrics.jsonl"))]
        curves[name] = [{k: r[k] for k in ("step", "eval_cer", "eval_wer", "eval_loss")} for r in rows
                        if "eval_cer" in r]
    return curves


def logged_curves(out: str, names) -> dict[str, list[dict]]:
    """The eval rows each start's run has written so far (finished or not): --plot-only."""
    curves = {}
    for name in names:
        path = os.path.join(out, "ctc_" + name.split()[0], "metrics.jsonl")
        if os.path.exists(path):
            rows = [json.loads(line) for line in open(path)]
            curves[name] = [{k: r[k] for k in ("step", "eval_cer", "eval_wer", "eval_loss")} for r in rows
                            if "eval_cer" in r]
    return {k: v for k, v in curves.items() if v}


def plot(record: dict, curves: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("v1", "v1 (pretrain-audio)"), ("v2", "2.0 (pretrain2-audio, M=8)")):
        rows = [r for r in record[key]["log"] if "loss" in r]
        steps = [r["step"] for r in rows]
        a.plot([s * record[key]["cpu_s_per_step"] for s in steps], [r["loss"] / rows[0]["loss"] for r in rows],
               label=f"{label}: {record[key]['steps']} updates")
    spent = {k: record[k]["steps"] * record[k]["cpu_s_per_step"] for k in ("v1", "v2")}
    a.set(xlabel="pre-training CPU seconds (steps x measured CPU s/step)", ylabel="train loss / first logged loss",
          title=f"pre-training CPU s: 2.0 {spent['v2']:.0f}, v1 {spent['v1']:.0f} (sized to 2.0's)")
    a.legend()
    for name, rows in curves.items():
        b.plot([r["step"] for r in rows], [100 * r["eval_cer"] for r in rows], marker="o", label=name)
    b.set(xlabel="CTC fine-tuning step (identical settings)", ylabel="eval CER (%)", ylim=(0, None),
          title="CTC fine-tuning, 100 eval utterances")
    b.legend()
    for name, rows in curves.items():
        c.plot([r["step"] for r in rows], [r["eval_loss"] for r in rows], marker="o", label=name)
    c.set(xlabel="CTC fine-tuning step", ylabel="eval CTC loss per utterance", title="the same runs: eval loss")
    c.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"# wrote {path}")


def table(record: dict, curves: dict) -> str:
    lines = ["| start | eval CER at each eval step | best CER | final CER |", "|---|---|---:|---:|"]
    for name, rows in curves.items():
        cers = [100 * r["eval_cer"] for r in rows]
        steps = " ".join(f"{r['step']}: {c:.1f}" for r, c in zip(rows, cers))
        lines.append(f"| {name} | {steps} | {min(cers):.1f} % | {cers[-1]:.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few steps of everything: a smoke test, not a result")
    p.add_argument("--v2-steps", type=int, default=60, help="2.0 pre-training updates; sets the CPU budget")
    p.add_argument("--calibration-steps", type=int, default=30, help="v1 updates timed to size v1's run")
    p.add_argument("--ft-steps", type=int, default=200, help="CTC fine-tuning updates of every start")
    p.add_argument("--ft-eval-every", type=int, default=25)
    p.add_argument("--log-every", type=int, default=10, help="pre-training steps between logs (CPU readings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--starts", nargs="*", default=(), help="fine-tune only these starts (to split the work "
                   "over processes); a scratch-only call needs no pre-training")
    p.add_argument("--plot-only", action="store_true", help="plot what the runs in --out have logged so far")
    p.add_argument("--out", default="/tmp/pretrain_quality", help="run directories (resumed if present)")
    p.add_argument("--json", default="benchmarks/results/pretrain_quality.json")
    p.add_argument("--figure", default="benchmarks/figures/pretrain_quality.png")
    args = p.parse_args(argv)
    if args.quick:
        args.v2_steps, args.calibration_steps, args.ft_steps, args.ft_eval_every, args.log_every = 6, 6, 4, 2, 2
    t0 = time.time()
    import jax  # the same program (same shapes, another start) compiles once, also across processes
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if args.starts and all("scratch" in k for k in args.starts):  # needs no pre-training
        fine_tune(args, args.out, {k: {"v1-arch scratch": "tiny"}.get(k) or untrained_v2(args.out, args)
                                   for k in args.starts})
        return
    record = pretrain(args, args.out)
    print(f"# budget {record['budget_cpu_s']:.0f} CPU s: 2.0 {record['v2']['steps']} updates at "
          f"{record['v2']['cpu_s_per_step']:.2f} CPU s; v1 {record['v1']['steps']} updates at "
          f"{record['v1']['cpu_s_per_step_calibration']:.2f} CPU s (calibration; "
          f"{record['v1']['cpu_s_per_step']:.2f} in the run)", flush=True)
    starts = {"v1 pre-trained": os.path.join(args.out, "pretrain1", "model"),
              "2.0 pre-trained": os.path.join(args.out, "pretrain2", "model"),
              "v1-arch scratch": "tiny", "2.0-arch scratch": untrained_v2(args.out, args)}
    if args.plot_only:
        curves = logged_curves(args.out, starts)
    else:
        curves = fine_tune(args, args.out, {k: v for k, v in starts.items() if not args.starts or k in args.starts})
    if args.starts:  # one part of a run split over processes; the last call, without --starts, plots
        return
    plot(record, curves, args.figure)
    print(table(record, curves))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "fine_tune": {**FT, **NO_SPEC_AUGMENT, "tri_stage_ratios": [0.1, 0.7, 0.2]},
                   "pretrain": {k: v for k, v in record.items()}, "ctc": curves,
                   "wall_s": time.time() - t0, "load_average_end": os.getloadavg()}, f, indent=1)
    print(f"# wrote {args.json}; {time.time() - t0:.0f} s wall")


if __name__ == "__main__":
    main()
