"""Convert a fairseq data2vec checkpoint (v1 or 2.0, speech or text, pre-trained or fine-tuned) to Orbax.

    python convert/fairseq_to_orbax.py base_libri.pt ckpt/d2v2-base-libri
    python convert/fairseq_to_orbax.py audio_base_ls.pt ckpt/d2v-base --weights teacher
    python convert/fairseq_to_orbax.py nlp_base.pt ckpt/d2v2-text --architecture Data2Vec2TextForSequenceClassification

The file is read without running its pickle's code (only tensors, plain containers and the few classes
fairseq stores are allowed). The result loads with `flax_data2vec.load(DST)`; a v1 result also exports to
transformers with convert/orbax_to_pytorch.py. Exit status 0 on success; on failure one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # run from a source checkout; `run` is shared with pytorch_to_orbax

from pytorch_to_orbax import missing, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC.pt", help="fairseq checkpoint file")
    parser.add_argument("dst", metavar="DST", help="directory to write the Orbax checkpoint to")
    parser.add_argument("--architecture", help="class to convert to (default: the file's own: e.g. "
                        "Data2VecAudioForCTC for a v1 CTC fine-tune, Data2Vec2AudioModel for a 2.0 pre-trained file)")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student",
                        help="pre-trained files: the student (default) or the EMA teacher")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    args = parser.parse_args(argv)
    if not os.path.exists(args.src):
        return missing(args.src)

    def convert() -> str:
        from flax_data2vec.fairseq import convert_to_orbax
        return convert_to_orbax(args.src, args.dst, args.architecture, args.weights, args.overwrite)
    return run(convert, args.debug)


if __name__ == "__main__":
    sys.exit(main())
