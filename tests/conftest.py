"""Shared test fixtures: tiny random transformers models and one way to compare outputs."""

import atexit
import contextlib
import os
import resource
import shutil
import tempfile

# One XLA compilation cache for the whole run, shared by pytest(-xdist) workers and the train_tpu.py subprocesses
# they start (set before jax is imported; children inherit it): the same step or init kernel compiles once.
# Only programs that took >= 1 s to compile are stored: with a size limit (which turns on the cache's file lock)
# every store lists and stats the whole directory, so thousands of millisecond eager-op entries made each later
# eager op cost ~10 ms of directory scanning (a tiny model's eager apply: 4 CPU-s alone, 50 CPU-s at 5000 entries).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = tempfile.mkdtemp(prefix="flax_data2vec-tests-xla-")
    atexit.register(shutil.rmtree, _JAX_CACHE, True)
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": _JAX_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
                       "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30)})

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

TOL = 1e-4  # max abs difference allowed against transformers in float32

AUDIO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
         "conv_dim": (16, 16, 16), "conv_stride": (5, 2, 2), "conv_kernel": (10, 3, 3),
         "num_conv_pos_embedding_groups": 4, "conv_pos_kernel_size": 5, "num_conv_pos_embeddings": 3, "vocab_size": 12,
         "classifier_proj_size": 10, "tdnn_dim": (8, 8, 12), "tdnn_kernel": (3, 3, 1), "tdnn_dilation": (1, 2, 1),
         "xvector_output_dim": 6, "num_labels": 3}
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37, "vocab_size": 99,
        "max_position_embeddings": 40, "num_labels": 3}


def tiny_torch_model(name: str, seed: int = 0, **overrides):
    """A random transformers model of class `name`, biases and norms perturbed so nothing is a constant."""
    torch.manual_seed(seed)
    audio = name.startswith("Data2VecAudio")
    config_cls = transformers.Data2VecAudioConfig if audio else transformers.Data2VecTextConfig
    extra = {"Data2VecTextForCausalLM": {"is_decoder": True}, "Data2VecTextForQuestionAnswering": {"num_labels": 2}}
    extra = extra.get(name, {})
    model = getattr(transformers, name)(config_cls(**{**(AUDIO if audio else TEXT), **extra, **overrides})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower() or n.endswith("bias") or "layer_weights" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model



def assert_close(name, got, want, tol=TOL):
    """got (flax) == want (torch or numpy) within `tol` max abs diff; tuples and None compared item by item."""
    if want is None or (isinstance(want, tuple) and len(want) == 0):
        assert got is None or len(got) == 0, f"{name}: flax gave a value, torch none"
        return
    if isinstance(want, (tuple, list)):
        assert got is not None and len(got) == len(want), f"{name}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(f"{name}[{i}]", g, w, tol)
        return
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    got = np.asarray(got)
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs torch {want.shape}"
    diff = np.max(np.abs(got.astype(np.float64) - want)) if want.size else 0.0
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol}"


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """This test converts into its own cache, never ~/.cache (files use it with `pytestmark`)."""
    monkeypatch.setenv("FLAX_DATA2VEC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def default_ctc_run(tmp_path_factory):
    """The no-argument train_tpu.py job (tiny CTC on the shipped speech data), bounded to 600 steps: trained once,
    checked by test_train and served by test_pipelines_trained. Returns (output dir, metrics.jsonl rows)."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path_factory.mktemp("default_ctc") / "run"
    args = ["--max-steps", "600", "--eval-every", "300", "--save-every", "300", "--log-every", "50",
            "--n-buckets", "2", "--progress", "false", "--output-dir", str(out)]
    proc = subprocess.run([sys.executable, os.path.join(root, "train_tpu.py"), *args], capture_output=True,
                          text=True, timeout=1500, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, f"train_tpu.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return str(out), [json.loads(line) for line in open(out / "metrics.jsonl")]


# Compile-bound tests (a few steps of a tiny model) compile with most XLA optimisations off: the CPU back end
# compiles a train step ~40 % faster (and runs it ~2x slower, so not for tests that train). The same switch for
# train_tpu.py subprocesses is FAST_COMPILE_ENV; runs compared with each other must all use it or none.
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@contextlib.contextmanager
def compiled_fast():
    """XLA programs compiled inside compile with most optimisations off (FAST_COMPILE_ENV in this process)."""
    import jax
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def fast_compile():
    """This test compiles with most XLA optimisations off (compiled_fast)."""
    with compiled_fast():
        yield


@pytest.fixture(scope="module")
def audio_model():
    """A tiny random transformers Data2VecAudioModel."""
    return tiny_torch_model("Data2VecAudioModel")


# Per-test CPU time (this process and its waited-for subprocesses), an estimate of idle-box wall time that holds
# on a busy machine: FLAX_DATA2VEC_TEST_CPU=N prints the N most expensive tests (0: all), with or without xdist.
_CPU_TOP = os.environ.get("FLAX_DATA2VEC_TEST_CPU")


def _cpu_seconds():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


if _CPU_TOP is not None:
    def _timed(item):
        start = _cpu_seconds()
        yield
        item.stash.setdefault(_CPU_KEY, []).append(_cpu_seconds() - start)

    _CPU_KEY = pytest.StashKey[list]()
    pytest_runtest_setup = pytest.hookimpl(hookwrapper=True)(_timed)
    pytest_runtest_call = pytest.hookimpl(hookwrapper=True)(_timed)
    pytest_runtest_teardown = pytest.hookimpl(hookwrapper=True)(_timed)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        report = (yield).get_result()
        spent = item.stash.get(_CPU_KEY, [])
        if spent:
            report.user_properties.append(("cpu_s", spent[-1]))  # the phase that just ran

    def pytest_terminal_summary(terminalreporter):
        total = {}
        for reports in terminalreporter.stats.values():
            for r in reports:
                for key, value in getattr(r, "user_properties", ()):
                    if key == "cpu_s":
                        total[r.nodeid] = total.get(r.nodeid, 0.0) + value
        top = sorted(total.items(), key=lambda kv: -kv[1])
        terminalreporter.write_sep("=", f"CPU seconds per test (sum {sum(total.values()):.0f} s)")
        for nodeid, seconds in top[: int(_CPU_TOP) or None]:
            terminalreporter.write_line(f"{seconds:9.1f}s  {nodeid}")


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker (--dist loadgroup)")


# Files whose single tests run whole training jobs or notebooks (minutes each), slowest first: collected first, so
# xdist hands them out first (after the multi-test groups, which it sorts ahead) and no long test starts last while
# the other worker idles. Order within a file is kept, so its module fixtures are still set up once.
HEAVY_FIRST = ("test_pretrain2.py", "test_notebooks.py", "test_pretrain_tasks.py", "test_train_tasks.py",
               "test_audio.py", "test_text.py", "test_speaker_verification.py", "test_question_answering.py",
               "test_data2vec2.py", "test_frame_classification.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Heavy files first (HEAVY_FIRST). Under `pytest -n N --dist loadgroup`, tests sharing a module- or
    session-scoped fixture (a trained model, converted checkpoints) run on one worker, so that fixture is built
    once rather than once per worker."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
    for item in items:
        defs = [d for ds in item._fixtureinfo.name2fixturedefs.values() for d in ds[-1:]
                if d.baseid and d.scope in ("module", "session")]  # pytest's own (tmp_path_factory) have no baseid
        # a conftest session fixture is shared across files and decides first; else the test's file is the group
        shared = sorted(f"0{d.argname}" if d.scope == "session" and not d.baseid.endswith(".py")
                        else f"1{item.path.name}" for d in defs)
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0][1:]))
