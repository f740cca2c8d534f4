"""train_tpu.py end to end: learning, devices (jit mesh, fsdp, pmap, two processes), resume, signals, errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train_tpu.py")
NO_DROPOUT = json.dumps({"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "num_hidden_layers": 2})
# a small text job: cheap to compile (the tiny preset at 2 layers, not 4), deterministic (no dropout)
TEXT_JOB = ["--task", "text-classification", "--batch-size", "16", "--n-buckets", "1", "--max-text-tokens", "32",
            "--model-config", NO_DROPOUT, "--progress", "false", "--log-every", "1", "--eval-every", "1000",
            "--async-checkpointing", "false"]


def run(args, env_extra=None, timeout=600, check=True):
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    proc = subprocess.run([sys.executable, TRAIN, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_tpu.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_in_one_process(arg_lists, env_extra=None, timeout=1200):
    """Several train_tpu.py runs one after another in one fresh interpreter (one start-up and import for all,
    e.g. every layout on 8 simulated devices)."""
    script = ("import json, sys; from flax_data2vec.train.config import parse_args; "
              "from flax_data2vec.train.loop import train\n"
              "for args in json.loads(sys.argv[1]): train(parse_args(args))")
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(arg_lists)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"runs failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r]


def test_help_lists_every_option():
    out = run(["--help"]).stdout
    for flag in ("--task", "--model", "--max-steps", "--parallel", "--fsdp", "--grad-accum", "--resume", "--dtype"):
        assert flag in out


def test_default_job_learns(default_ctc_run):
    """The no-argument job (tiny CTC on the shipped speech data), bounded: CER falls well below its start."""
    out, rows = default_ctc_run
    cers = [r["eval_cer"] for r in rows if "eval_cer" in r]
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert cers[0] > 0.9 and cers[-1] < 0.75, cers  # 1.0 = all blanks; ~0.55 reached at step 600 here
    assert os.path.isfile(os.path.join(out, "model", "config.json"))


REFERENCE_ARGS = TEXT_JOB + ["--max-steps", "4", "--save-every", "2"]
# the 4-step runs compared with the reference: compile-bound, so all compiled with most optimisations off
FAST = FAST_COMPILE_ENV


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted single-device run that the device and resume tests compare against."""
    out = tmp_path_factory.mktemp("reference")
    run(REFERENCE_ARGS + ["--output-dir", str(out)], FAST)
    return out


def test_devices_agree(tmp_path, reference_run):
    """1 device, an 8-device jit mesh (data; data x fsdp) and pmap give the same loss curve."""
    eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", **FAST}
    run_in_one_process([REFERENCE_ARGS + ["--output-dir", str(tmp_path / "mesh")],
                        REFERENCE_ARGS + ["--output-dir", str(tmp_path / "fsdp"), "--fsdp", "2"],
                        REFERENCE_ARGS + ["--output-dir", str(tmp_path / "pmap"), "--parallel", "pmap"]], eight)
    ref = losses(reference_run)
    assert len(ref) == 4 and ref[-1] < ref[0]
    for name in ("mesh", "fsdp", "pmap"):
        np.testing.assert_allclose(losses(tmp_path / name), ref, rtol=2e-5, err_msg=name)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path, reference_run):
    """jax.distributed on localhost: two CPU processes, each feeding half the batch."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", **FAST,
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
        procs.append(subprocess.Popen([sys.executable, TRAIN, *REFERENCE_ARGS, "--output-dir", str(tmp_path / "two")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(reference_run), rtol=2e-5)


def _final_state(out_dir):
    import orbax.checkpoint as ocp
    ckpt = os.path.join(out_dir, "checkpoints")
    step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
    with ocp.CheckpointManager(ckpt, item_names=("state", "meta")) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, reference_run):
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": ROOT, **FAST}
    proc = subprocess.Popen([sys.executable, TRAIN, *REFERENCE_ARGS, "--output-dir", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.isdir(killed / "checkpoints" / "2"):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(killed / "checkpoints" / "2")
    assert not os.path.isdir(killed / "model"), "the run finished before it could be killed"
    out = run(REFERENCE_ARGS + ["--output-dir", str(killed)], FAST)
    assert "resumed from step" in out.stdout
    a, b = _final_state(reference_run), _final_state(killed)
    assert int(a["step"]) == int(b["step"]) == 4
    import jax
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # metrics.jsonl: the killed run's rows after step 2 were dropped on resume, so each step appears once
    rows = [json.loads(line) for line in open(killed / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert losses(killed) == losses(reference_run)
    # a changed option is refused with the diff, and the run's record is kept ...
    original = (killed / "train_config.json").read_text()
    refused = run(REFERENCE_ARGS + ["--output-dir", str(killed), "--batch-size", "8"], FAST, check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert "holds a run (checkpoint at step 4) with other options: batch_size: 16 -> 8." in refused.stderr
    # ... unless --allow-config-change: the new options go beside the original (no step left to take here)
    run(REFERENCE_ARGS + ["--output-dir", str(killed), "--weight-decay", "0.02", "--allow-config-change"], FAST)
    assert (killed / "train_config.json").read_text() == original
    assert json.loads((killed / "train_config.resume-4.json").read_text())["weight_decay"] == 0.02


def test_sigterm_leaves_a_usable_checkpoint(tmp_path):
    out_dir = tmp_path / "term"
    args = TEXT_JOB + ["--max-steps", "100000", "--save-every", "100000", "--output-dir", str(out_dir)]
    env = {**os.environ, "PYTHONPATH": ROOT, **FAST}
    proc = subprocess.Popen([sys.executable, TRAIN, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(out_dir / "metrics.jsonl") and len(losses(out_dir)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, text
    assert "checkpoint saved" in text
    state = _final_state(out_dir)
    assert int(state["step"]) >= 2


def _manifest(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.mark.parametrize("case", ["missing_audio", "empty", "oov", "bad_label", "other_model"])
def test_bad_input_fails_before_compiling(tmp_path, case):
    data = os.path.join(ROOT, "data", "speech_digits")
    good = [json.loads(line) for line in open(os.path.join(data, "train.jsonl"))][:8]
    for r in good:
        r["path"] = os.path.join(data, r["path"])
    args = ["--max-steps", "2", "--progress", "false", "--output-dir", str(tmp_path / "out")]
    if case == "missing_audio":
        rows = good + [{"path": "/nonexistent/a.flac", "text": "one"}]
        args += ["--train-data", _manifest(tmp_path / "m.jsonl", rows)]
        expect = "a.flac"
    elif case == "empty":
        args += ["--train-data", _manifest(tmp_path / "m.jsonl", [])]
        expect = "no entries"
    elif case == "oov":
        vocab_rows = [dict(r) for r in good]
        bad = [dict(good[0], text="one ZWEI #")]
        args += ["--train-data", _manifest(tmp_path / "m.jsonl", vocab_rows),
                 "--eval-data", _manifest(tmp_path / "e.jsonl", bad)]
        expect = "not in the vocabulary"
    elif case == "bad_label":
        rows = [dict(r) for r in good]
        bad = [dict(good[0], label="no-such-class")]
        args += ["--task", "audio-classification", "--train-data", _manifest(tmp_path / "m.jsonl", rows),
                 "--eval-data", _manifest(tmp_path / "e.jsonl", bad)]
        expect = "no-such-class"
    else:
        run(TEXT_JOB + ["--max-steps", "1", "--output-dir", str(tmp_path / "out")], FAST)  # compile-bound
        args = TEXT_JOB + ["--max-steps", "2", "--output-dir", str(tmp_path / "out"),
                           "--model-config", json.dumps({"num_hidden_layers": 2})]
        expect = "with other options: model_config: "  # the diff (then max_steps: 1 -> 2), before the model is built
    start = time.time()
    proc = run(args, check=False)
    assert proc.returncode != 0
    assert expect in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if case != "other_model":
        assert not os.path.isdir(tmp_path / "out" / "checkpoints") or not os.listdir(tmp_path / "out" / "checkpoints")
    assert time.time() - start < 120


def test_benchmark_reports_step_throughput_and_torch(tmp_path):
    """`--benchmark` on the MLM task (masked-position targets are expanded for transformers' loss)."""
    out = run(["--task", "mlm", "--benchmark", "--batch-size", "4", "--max-text-tokens", "32",
               "--n-buckets", "1", "--output-dir", str(tmp_path / "bench")]).stdout
    fields = dict(line.strip().split(": ", 1) for line in out.splitlines() if ": " in line)
    assert float(fields["step_ms"]) > 0 and float(fields["tokens_per_s"]) > 0 and float(fields["compile_s"]) > 0
    assert float(fields["torch_step_ms"]) > 0 and "speedup_vs_torch" in fields
