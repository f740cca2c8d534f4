"""Every benchmark script parses its own command line: `--help` prints usage and exits 0 (a broken parser, e.g.
an option defined twice, would otherwise surface only on the machine that runs the benchmark)."""

import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                 if f.endswith(".py") and f not in ("__init__.py", "common.py", "models.py"))


def test_every_benchmark_is_listed():
    assert {"pipelines", "pretrain2", "train_step", "input_pipeline", "compare_commits"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_parses(name, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", "--help"])
    monkeypatch.syspath_prepend(ROOT)
    with pytest.raises(SystemExit) as stop:
        runpy.run_module(f"benchmarks.{name}", run_name="__main__")
    assert stop.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out
