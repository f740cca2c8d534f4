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
import tempfile
import warnings
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout


def run(convert: Callable[[], str], debug: bool = False) -> int:
    """Run `convert`, print the directory it wrote; on failure print one line on stderr and return 1.

    Without `debug`, stderr (file descriptor 2, where TensorStore's native threads also print) is held back
    while converting: replayed on success, dropped on failure, where the one `error:` line says it all.
    """
    if debug:
        print(convert())
        return 0
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs progress at INFO/WARNING
    with warnings.catch_warnings(), tempfile.TemporaryFile() as held:
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        sys.stderr.flush()
        real_stderr = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            directory = convert()
        except Exception as e:  # the CLI's contract: one clear line, no traceback
            sys.stderr.flush()
            os.dup2(real_stderr, 2)
            os.close(real_stderr)
            print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr, flush=True)
            return 1
        sys.stderr.flush()
        os.dup2(real_stderr, 2)
        os.close(real_stderr)
        held.seek(0)
        sys.stderr.buffer.write(held.read())
        sys.stderr.flush()
        print(directory)
        return 0


def missing(path: str) -> int:
    """The one-line failure for a source path that does not exist, found before JAX and Orbax load."""
    print(f"error: {os.path.abspath(path)} does not exist", file=sys.stderr, flush=True)
    return 1


def exit_with(code: int) -> None:
    """Exit; after a failure, tracebacks that native threads print late go to /dev/null, not after the error line."""
    if code:
        sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    sys.exit(code)


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
    exit_with(main())
