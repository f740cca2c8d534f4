"""Greedy vs n-gram-LM beam search on the tiny CTC model that `python train_tpu.py` trains on data/speech_digits.

    python -m benchmarks.lm_wer [--run OUTPUT_DIR] [--steps 1000] [--json out.json]

Without --run it first trains (`train_tpu.py --max-steps STEPS`). The bigram LM is built from the shipped
training transcripts by `flax_data2vec.pipelines.ngram.write_arpa` (ARPA), read by kenlm through pyctcdecode.
Also checks that the pipeline's greedy eval CER/WER equal the trainer's final eval figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "speech_digits")


def manifest(name: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in open(os.path.join(DATA, name))]
    return [os.path.join(DATA, r["path"]) for r in rows], [r["text"] for r in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="an existing train_tpu.py output directory (default: train one)")
    p.add_argument("--steps", type=int, default=1000, help="training steps when training here")
    p.add_argument("--alpha", type=float, default=0.5, help="LM weight")
    p.add_argument("--beta", type=float, default=1.0, help="word insertion bonus")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import jiwer

    import flax_data2vec as fd
    from flax_data2vec.pipelines.ngram import write_arpa
    run = args.run or os.path.join(tempfile.mkdtemp(), "run")
    if args.run is None:
        subprocess.run([sys.executable, os.path.join(ROOT, "train_tpu.py"), "--max-steps", str(args.steps),
                        "--progress", "false", "--output-dir", run], check=True, env={**os.environ, "PYTHONPATH": ROOT})
    final = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "eval_cer" in r][-1]
    files, refs = manifest("eval.jsonl")
    lm = write_arpa(os.path.join(tempfile.mkdtemp(), "digits.arpa"), manifest("train.jsonl")[1])
    greedy = [r["text"] for r in fd.pipeline("automatic-speech-recognition", run, batch_size=16)(files)]
    beam = fd.pipeline("automatic-speech-recognition", run, batch_size=16, lm=lm,
                       decoder_options=dict(alpha=args.alpha, beta=args.beta))
    with_lm = [r["text"] for r in beam(files)]
    result = {"step": final["step"], "trainer_eval_cer": final["eval_cer"], "trainer_eval_wer": final["eval_wer"],
              "pipeline_cer": jiwer.cer(refs, greedy), "pipeline_wer": jiwer.wer(refs, greedy),
              "lm_cer": jiwer.cer(refs, with_lm), "lm_wer": jiwer.wer(refs, with_lm)}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
