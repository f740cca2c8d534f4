"""Convert a transformers Data2Vec checkpoint (short name, hub repo id or local directory) to Orbax.

    python convert/pytorch_to_orbax.py data2vec-audio-base-960h ckpt/audio-base-960h
    python convert/pytorch_to_orbax.py ./my-finetuned-model ckpt/mine --architecture Data2VecAudioForCTC

The result (params + config.json) loads with `flax_data2vec.load(DST)`. Exit status 0 on success; on
failure one line on stderr (the full traceback with --debug).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout


def run(convert: Callable[[], str], debug: bool = False) -> int:
    """Run `convert`, print the directory it wrote; on failure print one line on stderr and return 1."""
    if not debug:  # Orbax logs progress, and on failure its worker threads' tracebacks: the one line says it all
        for name in ("absl", "asyncio", "orbax"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        try:
            print(convert())
            return 0
        except Exception as e:  # the CLI's contract: one clear line, no traceback
            if debug:
                raise
            print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
            return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC", help="short name (e.g. data2vec-audio-base), hub repo id, or local "
                        "transformers directory (config.json + model.safetensors or pytorch_model.bin)")
    parser.add_argument("dst", metavar="DST", help="directory to write the Orbax checkpoint to")
    parser.add_argument("--architecture", help="class to convert to (default: config.json's architectures), "
                        "e.g. Data2VecAudioForCTC; a base checkpoint gets a freshly initialised head")
    parser.add_argument("--revision", help="hub branch, tag or commit")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    args = parser.parse_args(argv)

    def convert() -> str:
        from flax_data2vec.hub import convert_to_orbax
        return convert_to_orbax(args.src, args.dst, args.architecture, args.overwrite, args.revision)
    return run(convert, args.debug)


if __name__ == "__main__":
    sys.exit(main())
