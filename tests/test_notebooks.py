"""The Colab notebooks in notebooks/ run top to bottom in their quick configuration (CI=1, no network) with no
error cell and their figures present (notebook 04's question answering also learning), and are stored in git
without outputs."""

import glob
import importlib.util
import json
import os
import resource
import time

import nbformat
import pytest
from nbclient import NotebookClient

from flax_data2vec.train.loop import Logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
# figures each notebook must show (as image/png outputs) and write to its output folder
FIGURES = {
    "01_quickstart": ["word_timestamps.png", "similarity.png"],
    "02_finetune_speech": ["training_curves.png"],
    "03_pretrain_data2vec": ["pretraining_curves.png", "finetune_cer.png"],
    "04_text_tasks": ["text_training_curves.png", "text_metrics.png"],
}


def _question_answering_learned(out):
    """Notebook 04's question-answering run (80 steps of the tiny preset on the shipped title questions) is also
    the QA task's learning test: exact match from ~0 (a random span) to well above it, a loadable QA export."""
    import flax_data2vec
    rows = [json.loads(line) for line in open(out / "qa" / "metrics.jsonl")]
    final = [r for r in rows if "eval_exact_match" in r][-1]
    assert final["eval_exact_match"] > 0.1 and final["eval_f1"] >= final["eval_exact_match"], final
    module, _ = flax_data2vec.load(str(out / "qa"))
    assert type(module).__name__ == "Data2VecTextForQuestionAnswering"


RESULT_CHECKS = {"04_text_tasks": _question_answering_learned}  # what a notebook's quick run must reach
LIMIT_S = 1200  # per notebook and per cell: ~1000 s wall each with four at once on a box at load 30-57


def test_every_notebook_is_listed():
    names = sorted(os.path.basename(p)[:-6] for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
    assert names == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_stored_without_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name + ".ipynb"), as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i} holds outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "QUICK" in tagged[0].source and "REPO_URL" in tagged[0].source


def _build_script():
    spec = importlib.util.spec_from_file_location("notebooks_build", os.path.join(NOTEBOOK_DIR, "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_built_from_their_sources():
    """The committed .ipynb and README badges are what notebooks/build.py writes from notebooks/src and setup.cfg."""
    build = _build_script()
    assert build.main(["--check"]) == 0
    url = build.repo_url()
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for name in FIGURES:
        assert f"{build.colab_prefix(url)}{name}.ipynb" in readme, f"README: no Colab badge for {name}"


def test_setup_cell_outside_a_checkout_refuses_the_placeholder_url(tmp_path, monkeypatch):
    """On Colab with REPO_URL still the placeholder: one message saying what to set, not a git error."""
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, "01_quickstart.ipynb"), as_version=4)
    setup = next(c.source for c in nb.cells if c.source.startswith("# Setup:"))
    monkeypatch.chdir(tmp_path)  # no ../flax_data2vec here: the notebook is not inside a checkout
    with pytest.raises(SystemExit, match="REPO_URL is still the placeholder"):
        exec(setup, {"os": os, "REPO_URL": "https://github.com/OWNER/flax_data2vec"})
    assert not (tmp_path / "flax_data2vec").exists()


def inject_parameters(nb, **values):
    """What papermill does: a cell after the one tagged `parameters` that assigns new values."""
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, cell)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_runs_in_ci_mode(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend makes the image outputs
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    out = tmp_path / name
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name + ".ipynb"), as_version=4)
    inject_parameters(nb, OUTPUT_DIR=str(out))
    start, cpu = time.perf_counter(), _children_cpu_s()
    try:
        NotebookClient(nb, timeout=LIMIT_S, kernel_name="python3",
                       resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
    finally:
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(out / f"{name}.executed.ipynb"))  # for reading after a failure
    elapsed = time.perf_counter() - start
    # CPU seconds of the kernel and its subprocesses: with the machine shared, wall time alone says little
    print(f"{name}: {elapsed:.0f} s wall, {_children_cpu_s() - cpu:.0f} s CPU")
    assert elapsed < LIMIT_S, f"{name} took {elapsed:.0f} s"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= len(FIGURES[name]), f"{name}: {len(images)} figures shown"
    for figure in FIGURES[name]:
        assert (out / figure).stat().st_size > 5000, f"{name}: {figure} missing or empty"
    if name in RESULT_CHECKS:
        RESULT_CHECKS[name](out)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_logger_calls_on_log_with_each_row(tmp_path):
    rows = []
    logger = Logger(str(tmp_path), True, on_log=rows.append)
    logger.log(5, {"loss": 2.5, "eval_example": "a -> b"})
    logger.close()
    assert rows == [{"step": 5, "loss": 2.5, "eval_example": "a -> b"}]
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == rows
