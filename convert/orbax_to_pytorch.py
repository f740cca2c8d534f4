"""Convert an Orbax checkpoint written by flax_data2vec to a transformers directory.

    python convert/orbax_to_pytorch.py ckpt/audio-base-960h hf/audio-base-960h

DST gets config.json (with `architectures` and `model_type`) and model.safetensors, which
`transformers.<Class>.from_pretrained(DST)` and the matching AutoModel class load, and the processor files
`transformers.pipeline(task, model=DST)` needs: the tokenizer (an error if SRC has none, unless --weights-only)
and, for audio, preprocessor_config.json. Exit status 0 on success;
on failure one line on stderr (the full traceback with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # run from a source checkout; `run` is shared with pytorch_to_orbax

from pytorch_to_orbax import exit_with, missing, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC", help="Orbax checkpoint directory written by flax_data2vec")
    parser.add_argument("dst", metavar="DST", help="directory to write the transformers checkpoint to")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--weights-only", action="store_true",
                        help="write the model even if SRC has no tokenizer (transformers.pipeline cannot run it)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    args = parser.parse_args(argv)
    if not os.path.exists(args.src):
        return missing(args.src)

    def convert() -> str:
        from flax_data2vec.hub import convert_to_transformers
        return convert_to_transformers(args.src, args.dst, args.overwrite, args.weights_only)
    return run(convert, args.debug)


if __name__ == "__main__":
    exit_with(main())
