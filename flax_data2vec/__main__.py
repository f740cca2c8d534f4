"""Command line: `python -m flax_data2vec transcribe|classify|embed|fill-mask|evaluate ... --model M`.

    python -m flax_data2vec transcribe a.flac b.wav --model data2vec-audio-base-960h --timestamps word --format srt
    python -m flax_data2vec evaluate --model ./outputs/run --data data/speech_digits/eval.jsonl
    python -m flax_data2vec embed *.wav --model data2vec-audio-base --output embeddings.npy

Each command shows a progress bar over its inputs; on failure it prints one `error:` line (--debug: traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="short name, hub repo id, local checkpoint or train_tpu.py output")
    p.add_argument("--batch-size", type=int, default=8, help="rows per compiled call (default: 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--parallel", choices=("jit", "pmap"), default="jit",
                   help="how each batch is split over the local devices: jit (one program over a device mesh; "
                        "default) or pmap (one replica per device)")
    p.add_argument("--progress", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="show a progress bar (default: true)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")


def _asr_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-length-s", type=float, default=0, help="cut long audio into chunks of this many seconds")
    p.add_argument("--stride-length-s", type=float, default=None, help="overlap each side (default: chunk/6)")
    p.add_argument("--lm", default=None, help="kenlm n-gram (.arpa or .bin) for beam search (pyctcdecode + kenlm)")
    p.add_argument("--beam", action="store_true", help="beam search (pyctcdecode) even without --lm")
    p.add_argument("--hotwords", nargs="*", default=None, help="words the beam search should favour")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m flax_data2vec", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("transcribe", help="speech to text with a CTC checkpoint")
    p.add_argument("files", nargs="+", help="audio files (anything soundfile reads)")
    _common(p)
    _asr_options(p)
    p.add_argument("--timestamps", choices=("char", "word"), default=None, help="add chunks with (start, end)")
    p.add_argument("--format", choices=("text", "jsonl", "srt", "vtt"), default="text", help="output format")
    p.add_argument("--output-dir", default=None, help="srt/vtt: write <name>.srt|vtt files here, not to stdout")
    p = sub.add_parser("classify", help="audio or text classification (by the checkpoint's head)")
    p.add_argument("inputs", nargs="+", help="audio files, or texts for a text checkpoint")
    _common(p)
    p.add_argument("--top-k", type=int, default=1, help="labels per input (default: 1)")
    p = sub.add_parser("embed", help="pooled embeddings of audio files or texts, written as .npy")
    p.add_argument("inputs", nargs="+", help="audio files, or texts for a text checkpoint")
    _common(p)
    p.add_argument("--output", required=True, help="where to write the (n, hidden) float32 .npy")
    p.add_argument("--pooling", choices=("mean", "data2vec"), default="mean", help="(default: mean)")
    p.add_argument("--top-k-layers", type=int, default=8, help="layers averaged by --pooling data2vec")
    p = sub.add_parser("fill-mask", help="fill the <mask> tokens of texts")
    p.add_argument("inputs", nargs="+", help="texts holding the tokenizer's mask token")
    _common(p)
    p.add_argument("--top-k", type=int, default=5, help="fillers per mask (default: 5)")
    p = sub.add_parser("evaluate", help="transcribe a dataset and print WER and CER (jiwer)")
    _common(p)
    _asr_options(p)
    p.add_argument("--data", required=True, help="a .jsonl manifest (path, text), or hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    return top


def _bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc=desc, file=sys.stderr, dynamic_ncols=True)


def _in_steps(pipe, items: list, enabled: bool, desc: str, **options) -> list:
    """Run `pipe` over items a few batches at a time, advancing a progress bar."""
    out, step = [], pipe.batch_size * 4
    with _bar(len(items), enabled, desc) as bar:
        for i in range(0, len(items), step):
            out.extend(pipe(items[i:i + step], **options))
            bar.update(len(items[i:i + step]))
    return out


def _asr(args):
    from . import pipeline
    options = {}
    if args.beam or args.lm or args.hotwords:
        options["decoder_options"] = {}
    return pipeline("automatic-speech-recognition", args.model, batch_size=args.batch_size, dtype=_dtype(args),
                    parallel=args.parallel, lm=args.lm, **options)


def _dtype(args):
    import jax.numpy as jnp
    return jnp.bfloat16 if args.dtype == "bfloat16" else None


def _asr_call_options(args) -> dict:
    out = {"chunk_length_s": args.chunk_length_s, "stride_length_s": args.stride_length_s}
    if args.hotwords:
        out["decoder_kwargs"] = {"hotwords": args.hotwords}
    return out


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def subtitles(chunks: list[dict], fmt: str, words_per_cue: int = 8) -> str:
    """SRT or WebVTT cues of up to `words_per_cue` timed words each."""
    sep = "," if fmt == "srt" else "."
    cues = [chunks[i:i + words_per_cue] for i in range(0, len(chunks), words_per_cue)]
    lines = [] if fmt == "srt" else ["WEBVTT", ""]
    for n, cue in enumerate(cues, 1):
        if fmt == "srt":
            lines.append(str(n))
        lines.append(f"{_clock(cue[0]['timestamp'][0], sep)} --> {_clock(cue[-1]['timestamp'][1], sep)}")
        lines += [" ".join(c["text"] for c in cue), ""]
    return "\n".join(lines)


def transcribe(args) -> None:
    asr = _asr(args)
    timestamps = args.timestamps or ("word" if args.format in ("srt", "vtt") else None)
    opts = {**_asr_call_options(args), **({"return_timestamps": timestamps} if timestamps else {})}
    results = _in_steps(asr, list(args.files), args.progress, "transcribe", **opts)
    for path, r in zip(args.files, results):
        if args.format == "text":
            print(r["text"] if len(args.files) == 1 else f"{path}\t{r['text']}")
        elif args.format == "jsonl":
            print(json.dumps({"file": path, **r}, ensure_ascii=False))
        else:
            text = subtitles(r["chunks"], args.format)
            if args.output_dir:
                os.makedirs(args.output_dir, exist_ok=True)
                name = os.path.splitext(os.path.basename(path))[0] + "." + args.format
                with open(os.path.join(args.output_dir, name), "w", encoding="utf-8") as f:
                    f.write(text)
            else:
                print(text)
    _report(asr)


def _report(pipe) -> None:
    s = pipe.stats
    print(f"{s.compiles} compiled shape(s) in {s.compile_s:.1f} s; run {s.run_s:.2f} s over {s.batches} batches",
          file=sys.stderr)


def classify(args) -> None:
    from . import pipeline
    from .pipelines import resolve_model
    model = resolve_model(args.model, dtype=_dtype(args))
    task = "audio-classification" if model.architecture.startswith("Data2VecAudio") else "text-classification"
    pipe = pipeline(task, model, batch_size=args.batch_size, parallel=args.parallel)
    for x, r in zip(args.inputs, _in_steps(pipe, list(args.inputs), args.progress, "classify", top_k=args.top_k)):
        print(json.dumps({"input": x, "labels": r}, ensure_ascii=False))
    _report(pipe)


def embed(args) -> None:
    import numpy as np

    from . import pipeline
    pipe = pipeline("feature-extraction", args.model, batch_size=args.batch_size, dtype=_dtype(args),
                    parallel=args.parallel, pooling=args.pooling, top_k_layers=args.top_k_layers)
    rows, step = [], pipe.batch_size * 4
    with _bar(len(args.inputs), args.progress, "embed") as bar:
        for i in range(0, len(args.inputs), step):
            rows.append(pipe.embed(list(args.inputs[i:i + step])))
            bar.update(len(args.inputs[i:i + step]))
    out = np.concatenate(rows)
    np.save(args.output, out)
    print(f"wrote {out.shape} embeddings to {args.output}", file=sys.stderr)


def fill_mask(args) -> None:
    from . import pipeline
    pipe = pipeline("fill-mask", args.model, batch_size=args.batch_size, dtype=_dtype(args), parallel=args.parallel)
    for x, r in zip(args.inputs, _in_steps(pipe, list(args.inputs), args.progress, "fill-mask", top_k=args.top_k)):
        print(json.dumps({"input": x, "fillers": r}, ensure_ascii=False))


def read_dataset(spec: str, limit: int | None) -> tuple[list, list[str]]:
    """(audio inputs, reference texts) of a .jsonl manifest (paths relative to it) or `hf:NAME[:CONFIG][@SPLIT]`."""
    if spec.startswith("hf:"):
        import datasets
        name, _, split = spec[3:].partition("@")
        name, _, config = name.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split or "test")
        if limit:
            ds = ds.select(range(min(limit, len(ds))))
        column = "text" if "text" in ds.column_names else "sentence"
        return list(ds["audio"]), list(ds[column])
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"no manifest at {spec}")
    base, audio, texts = os.path.dirname(os.path.abspath(spec)), [], []
    with open(spec, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path, text = row["path"], row["text"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{spec} line {n}: expected a JSON object with 'path' and 'text'") from None
            audio.append(path if os.path.isabs(path) else os.path.join(base, path))
            texts.append(text)
            if limit and len(audio) == limit:
                break
    if not audio:
        raise ValueError(f"{spec} holds no examples")
    return audio, texts


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def evaluate(args) -> dict:
    import jiwer
    audio, refs = read_dataset(args.data, args.limit)
    asr = _asr(args)
    hyps = [r["text"] for r in _in_steps(asr, audio, args.progress, "evaluate", **_asr_call_options(args))]
    refs, hyps = [normalize(t) for t in refs], [normalize(t) for t in hyps]
    result = {"examples": len(refs), "wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}
    print(f"{result['examples']} examples: WER {result['wer']:.4f}, CER {result['cer']:.4f}")
    _report(asr)
    return result


COMMANDS = {"transcribe": transcribe, "classify": classify, "embed": embed, "fill-mask": fill_mask,
            "evaluate": evaluate}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, ImportError, TypeError, OSError, KeyError) as e:
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
