"""The command lines as a careless user meets them: every bad input is one `error:` line, early, with nothing written;
`--help` documents every option; hub names without network fail at once; a failed checkpoint write stops the run."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from flax_data2vec.train.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, os.path.join(ROOT, "train_tpu.py")]
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
NO_NETWORK = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on the discard port: connection refused
OFFLINE = {"HF_HUB_OFFLINE": "1"}

# (name, command after the program, extra environment, what the one line must say, seconds allowed under load)
QUICK, WITH_JAX = 15, 40  # checks before JAX loads take ~1 s idle; the device checks import JAX (~2 s idle)
CASES = [
    ("negative lr", [*TRAIN, "--learning-rate", "-1"], {}, "error: --learning-rate -1.0: must be >= 0", QUICK),
    ("zero batch", [*TRAIN, "--batch-size", "0"], {}, "error: --batch-size 0: must be >= 1", QUICK),
    ("zero eval interval", [*TRAIN, "--eval-every", "0"], {}, "error: --eval-every 0: must be >= 1", QUICK),
    ("warm-up ratio", [*TRAIN, "--warmup-ratio", "1.5"], {}, "error: --warmup-ratio 1.5: must be in [0, 1]", QUICK),
    ("probability", [*TRAIN, "--mask-time-prob", "2"], {}, "error: --mask-time-prob 2.0: must be in [0, 1], or -1",
     QUICK),
    ("odd batch, jit", [*TRAIN, "--batch-size", "7"], TWO_DEVICES,
     "error: --batch-size 7: must be a multiple of 2 (2 device(s) x --grad-accum 1", WITH_JAX),
    ("odd batch, pmap", [*TRAIN, "--batch-size", "7", "--parallel", "pmap"], TWO_DEVICES,
     "error: --batch-size 7: must be a multiple of 2 (2 device(s) x --grad-accum 1", WITH_JAX),
    ("unknown task", [*TRAIN, "--task", "nonsense"], {},
     "error: --task nonsense: must be one of ctc, audio-classification,", QUICK),
    ("float16", [*TRAIN, "--dtype", "float16"], {},
     "error: --dtype float16: must be one of float32, bfloat16; did you mean 'bfloat16'", QUICK),
    ("model-config typo", [*TRAIN, "--model-config", '{"hidden_sizee": 64}'], {},
     "'hidden_sizee' is not a Data2VecAudioConfig field; did you mean 'hidden_size'", QUICK),
    ("model-config value", [*TRAIN, "--model-config", '{"num_attention_heads": 3}'], {},
     "hidden_size (128) must be divisible by num_attention_heads (3)", QUICK),
    ("missing --config", [*TRAIN, "--config", "nope.json"], {}, "error: --config nope.json: no such file", QUICK),
    ("missing train data", [*TRAIN, "--train-data", "nope.jsonl"], {}, "error: --train-data nope.jsonl: no such file",
     QUICK),
    ("unknown model", [*TRAIN, "--model", "not-a-model"], {},
     "error: --model not-a-model: unknown model; give a preset (tiny, base, large), a short name "
     "(data2vec-audio-base,", QUICK),
    ("bad boolean", [*TRAIN, "--resume", "maybe"], {}, "error: argument --resume: invalid boolean value: 'maybe'",
     QUICK),
    ("missing orbax checkpoint", [sys.executable, os.path.join(ROOT, "convert", "orbax_to_pytorch.py"),
                                  "./nonexistent", "OUT"], {}, "nonexistent does not exist", QUICK),
    ("hub offline", [sys.executable, "-m", "flax_data2vec", "transcribe", "a.wav", "--model",
                     "data2vec-audio-base-960h"], OFFLINE, "HF_HUB_OFFLINE is set, and it is not in the hub cache",
     WITH_JAX),
    ("hub unreachable", [sys.executable, "-m", "flax_data2vec", "transcribe", "a.wav", "--model",
                         "data2vec-audio-base-960h"], NO_NETWORK,
     "the hub (http://127.0.0.1:9) cannot be reached: Connection refused, and it is not in the hub cache", WITH_JAX),
]


def _run_case(case, directory):
    name, argv, env, _, _ = case
    out = os.path.join(directory, "out")
    if argv[:2] == TRAIN:
        argv = [*argv, "--output-dir", out]
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HOME": os.path.join(directory, "hf"), **env}
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=directory, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - start, out


def test_every_bad_input_is_one_line_early_and_writes_nothing(tmp_path):
    dirs = [tmp_path / f"case{i}" for i in range(len(CASES))]
    for d in dirs:
        d.mkdir()
    with ThreadPoolExecutor(3) as pool:  # 2 cores: a few at a time keeps each case's time meaningful
        results = list(pool.map(_run_case, CASES, map(str, dirs)))
    problems = []
    for (name, argv, _, want, limit), (proc, seconds, out) in zip(CASES, results):
        lines = proc.stderr.strip().splitlines()
        if proc.returncode == 0 or len(lines) != 1 or want not in lines[0] or not lines[0].startswith("error: "):
            problems.append(f"{name}: exit {proc.returncode}, stderr {proc.stderr[-600:]!r}")
        elif argv[:2] == TRAIN and proc.returncode != 2:  # argparse's status for bad arguments
            problems.append(f"{name}: exit {proc.returncode}, expected 2")
        if os.path.exists(out):
            problems.append(f"{name}: wrote {os.listdir(out)}")
        if seconds > limit:
            problems.append(f"{name}: took {seconds:.1f} s")
        if "Retrying" in proc.stdout + proc.stderr:
            problems.append(f"{name}: retried")
    assert not problems, "\n".join(problems)


def test_help_documents_every_option_once():
    out = subprocess.run([*TRAIN, "--help"], env={**os.environ, "PYTHONPATH": ROOT, "COLUMNS": "200"},
                         capture_output=True, text=True, check=True).stdout
    lines, flag = {}, None  # flag -> its help text (argparse puts a long flag's text on the next line)
    for line in out.split("\noptions:")[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0]
            lines[flag] = line
        elif flag:
            lines[flag] += " " + line.strip()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in lines, flag
        assert f.metadata["doc"].split()[0] in lines[flag], lines[flag]  # its own description
        assert lines[flag].count("[default:") <= 1 and "(default:" not in lines[flag], lines[flag]
    assert "[default: ctc]" in lines["--task"] and "one of: ctc, audio-classification" in lines["--task"]
    assert "one of: float32, bfloat16 [default: float32]" in lines["--dtype"]
    assert "one of: jit, pmap" in lines["--parallel"] and "tri_stage, linear, cosine" in lines["--schedule"]
    assert "tiny, base, large" in lines["--model"]


def test_failed_save_stops_the_run_at_once(tmp_path):
    """A 5 MiB disk holds one ~3 MiB checkpoint of the linear task: the second write fails in Orbax's background
    thread; the run stops with one line, its temp files removed and the first checkpoint intact."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}): the disk-full test needs one")
    try:
        out = disk / "run"
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "linear_task.py"), "--max-steps", "100",
                               "--save-every", "1", "--log-every", "1", "--progress", "false",
                               "--output-dir", str(out)], env={**os.environ, "PYTHONPATH": ROOT},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            f"error: checkpoint 2 could not be written to {out / 'checkpoints'}: no space left on device; "
            "the last good checkpoint, step 1, is intact"], proc.stderr[-2000:]
        assert sorted(os.listdir(out / "checkpoints")) == ["1"]  # no temp directory left
        steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
        assert max(steps) <= 3, steps  # stopped at once, not at the end of the run
        import orbax.checkpoint as ocp
        with ocp.CheckpointManager(out / "checkpoints", item_names=("state", "meta")) as mngr:
            meta = mngr.restore(1, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        assert meta["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)], check=False)
