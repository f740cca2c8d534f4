"""Writes notebooks/*.ipynb (outputs stripped) from their sources in notebooks/src/, and the README's Colab links.

Edit the sources, not the .ipynb: `python notebooks/build.py` rebuilds them; `--check` fails if a committed file
differs from what the sources give (tests/test_notebooks.py runs it). A source is a Python file in jupytext's
percent format: each cell starts with a `# %%` line, `# %% [markdown]` for Markdown (every line behind `# `),
`# %% tags=["parameters"]` for the papermill parameters cell, and `# %% include NAME` for the shared code cell in
src/_NAME.py (the setup cell and the live plot, one copy for all notebooks). The repository URL is setup.cfg's
`url`, the one place to change it: every notebook's `REPO_URL` and the README's badges are written from it.
"""

import argparse
import configparser
import json
import os
import re
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(HERE, "src")
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^)\s]*?/blob/main/notebooks/")
METADATA = {"accelerator": "TPU", "colab": {"provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}}


def repo_url() -> str:
    """setup.cfg's [metadata] url: where the notebooks clone the package from on Colab and Kaggle."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return cfg["metadata"]["url"].rstrip("/")


def colab_prefix(url: str) -> str:
    """The Colab address of the notebooks folder of the GitHub repository at `url`."""
    return "https://colab.research.google.com/github/" + url.split("github.com/", 1)[1] + "/blob/main/notebooks/"


def cells(path: str, url: str) -> list:
    """The notebook cells of one percent-format source file."""
    with open(path, encoding="utf-8") as f:
        chunks = re.split(r"^(# %%.*)\n", f.read(), flags=re.M)[1:]
    out = []
    for header, body in zip(chunks[::2], chunks[1::2]):
        body = body.strip("\n")
        option = header[len("# %%"):].strip()
        if option == "[markdown]":
            out.append(nbformat.v4.new_markdown_cell("\n".join(re.sub(r"^# ?", "", line)
                                                               for line in body.split("\n"))))
        elif option.startswith("include "):
            out.append(included_cell(option.split()[1]))
        elif option in ("", 'tags=["parameters"]'):
            cell = nbformat.v4.new_code_cell(re.sub(r'^REPO_URL = "[^"]*"', f'REPO_URL = "{url}"', body, flags=re.M))
            if option:
                cell.metadata["tags"] = ["parameters"]
            out.append(cell)
        else:
            raise ValueError(f"{path}: unknown cell header {header!r}")
    return out


def included_cell(name: str):
    """The shared code cell in src/_NAME.py."""
    with open(os.path.join(SRC, f"_{name}.py"), encoding="utf-8") as f:
        return nbformat.v4.new_code_cell(f.read().strip("\n"))


def notebook(name: str, url: str) -> str:
    """The .ipynb text of notebooks/src/NAME.py, with stable cell ids (so rebuilds do not churn)."""
    nb = nbformat.v4.new_notebook(metadata=json.loads(json.dumps(METADATA)))
    nb.cells = cells(os.path.join(SRC, name + ".py"), url)
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:02d}"
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def readme(text: str, url: str) -> str:
    return COLAB_LINK.sub(colab_prefix(url), text)


def targets(url: str) -> dict:
    """Every file this script owns -> its content from the sources."""
    names = sorted(f[:-3] for f in os.listdir(SRC) if f.endswith(".py") and not f.startswith("_"))
    out = {os.path.join(HERE, n + ".ipynb"): notebook(n, url) for n in names}
    readme_path = os.path.join(ROOT, "README.md")
    with open(readme_path, encoding="utf-8") as f:
        out[readme_path] = readme(f.read(), url)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ from the sources")
    args = parser.parse_args(argv)
    stale = []
    for path, text in targets(repo_url()).items():
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old != text:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    if stale:
        print(("out of date (run python notebooks/build.py): " if args.check else "wrote: ") + ", ".join(stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
