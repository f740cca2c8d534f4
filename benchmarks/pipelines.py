"""flax_data2vec.pipeline vs transformers.pipeline, same random base-size weights, same inputs, same process.

    python -m benchmarks.pipelines [--quick] [--repeats 3] [--json out.json] [--wait-quiet 600]

Cases: ASR over the shipped eval set (100 clips) and 8 x 10 s, with data2vec-audio-base shapes; fill-mask,
text-classification and feature-extraction at 8 x 128 tokens with data2vec-text-base shapes. Whole calls
are timed (host work included). The first call of each side is a warm-up; its compile time (ours) is
reported apart. Timed calls alternate between the two sides.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from .common import base_parser, setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.join(ROOT, "data", "speech_digits", "eval.jsonl")
CTC_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz'"]


def audio_checkpoint(directory: str, quick: bool) -> str:
    import torch
    import transformers

    from flax_data2vec import processors
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 conv_dim=(16,) * 7) if quick else {}
    torch.manual_seed(0)
    config = transformers.Data2VecAudioConfig(vocab_size=len(CTC_TOKENS), pad_token_id=0, **small)
    transformers.Data2VecAudioForCTC(config).eval().save_pretrained(directory)
    processors.save_ctc_processor(directory, CTC_TOKENS)
    return directory


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with `vocab_size` entries (RoBERTa specials), so the LM head has base shape."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>", model_max_length=512)


def text_checkpoint(directory: str, class_name: str, quick: bool) -> str:
    import torch
    import transformers
    vocab = 1000 if quick else 50265
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37) if quick else {}
    torch.manual_seed(0)
    config = transformers.Data2VecTextConfig(vocab_size=vocab, max_position_embeddings=514, type_vocab_size=1,
                                             layer_norm_eps=1e-5, num_labels=3, **small)
    getattr(transformers, class_name)(config).eval().save_pretrained(directory)
    word_tokenizer(vocab).save_pretrained(directory)
    return directory


def sentences(n: int, words: int, mask: bool, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = [f"w{i}" for i in rng.integers(0, 900, words)]
        if mask:
            w[words // 2] = "<mask>"
        out.append(" ".join(w))
    return out


def compare(name: str, unit: str, amount: float, ours, theirs, repeats: int) -> dict:
    """Warm both (ours compiles here), then alternate timed calls; per-call medians and throughput."""
    t0 = time.perf_counter()
    ours.call()
    first_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs.call()
    first_theirs = time.perf_counter() - t0
    times = {"ours": [], "theirs": []}
    for r in range(repeats):
        for side in (("ours", ours), ("theirs", theirs))[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            side[1].call()
            times[side[0]].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    row = {"case": name, "unit": unit, "ours_s": med["ours"], "transformers_s": med["theirs"],
           "ours_per_s": amount / med["ours"], "transformers_per_s": amount / med["theirs"],
           "speedup": med["theirs"] / med["ours"], "ours_compile_s": ours.pipe.stats.compile_s,
           "ours_compiles": ours.pipe.stats.compiles, "ours_first_call_s": first_ours,
           "transformers_first_call_s": first_theirs, "times": times}
    print(f"{name:34s} ours {med['ours']:7.3f} s ({row['ours_per_s']:8.1f} {unit}/s)  transformers "
          f"{med['theirs']:7.3f} s ({row['transformers_per_s']:8.1f} {unit}/s)  x{row['speedup']:.2f}  "
          f"compile {row['ours_compile_s']:.1f} s in {row['ours_compiles']} shape(s)", flush=True)
    return row


class Call:
    def __init__(self, pipe, inputs, **kw):
        self.pipe, self.inputs, self.kw = pipe, inputs, kw

    def call(self):
        inputs = [x.copy() if isinstance(x, np.ndarray) else x for x in self.inputs]  # transformers edits arrays
        return self.pipe(inputs, **self.kw)


def text_cases(tmp: str, bs: int, args) -> list[dict]:
    """fill-mask, text-classification and feature-extraction at bs x 128 tokens, text-base shapes."""
    import transformers

    import flax_data2vec as fd
    rows, texts, plain = [], sentences(bs, 126, mask=True), sentences(bs, 126, mask=False)
    for task, class_name, inputs, kw in (
            ("fill-mask", "Data2VecTextForMaskedLM", texts, {}),
            ("text-classification", "Data2VecTextForSequenceClassification", plain, {}),
            ("feature-extraction", "Data2VecTextModel", plain, {"return_tensors": True})):
        d = text_checkpoint(os.path.join(tmp, task), class_name, args.quick)
        rows.append(compare(f"{task} {bs} x 128", "seq", bs, Call(fd.pipeline(task, d, batch_size=bs), inputs, **kw),
                            Call(transformers.pipeline(task, model=d, batch_size=bs), inputs, **kw), args.repeats))
    return rows


def asr_stages(ours, theirs, clips, repeats: int) -> dict:
    """Median seconds of each stage of one ASR call on `clips` (one batch, compiled first), ours and theirs:
    decoding inputs, feature extraction + padding, device transfer, the forward, fetching + CTC decoding."""
    import jax
    import torch

    from flax_data2vec.pipelines.asr import Piece
    fwd = ours.forward
    waves = ours.waveforms(clips)
    x, mask = ours.prepare(waves)
    jax.block_until_ready(fwd(x, mask))  # compiled here
    stages = {"ours_inputs": lambda: ours.waveforms(clips), "ours_features_pad": lambda: ours.prepare(waves),
              "ours_device_put": lambda: jax.block_until_ready(jax.device_put((x, mask), fwd.batch_sharding)),
              "ours_forward": lambda: jax.block_until_ready(fwd(x, mask))}
    out = fwd(x, mask)
    pieces = [Piece(i, w, None) for i, w in enumerate(waves)]
    stages["ours_fetch_decode"] = lambda: [ours._decode(v, None, {}) for _, v in ours._finish((pieces,), out)]
    inputs = theirs.feature_extractor([c.copy() for c in clips], sampling_rate=16000, padding=True,
                                      return_attention_mask=True, return_tensors="pt")
    with torch.inference_mode():
        logits = theirs.model(**inputs).logits
    stages["transformers_features_pad"] = lambda: theirs.feature_extractor(
        [c.copy() for c in clips], sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")

    def torch_forward():
        with torch.inference_mode():
            return theirs.model(**inputs).logits
    stages["transformers_forward"] = torch_forward
    stages["transformers_decode"] = lambda: theirs.tokenizer.batch_decode(logits.argmax(-1))
    times = {k: [] for k in stages}
    for _ in range(repeats):
        for k, f in stages.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    row = {"case": f"ASR stages {len(clips)} x {len(clips[0]) / 16000:.0f} s", **{k: float(np.median(v))
                                                                               for k, v in times.items()}}
    print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else v for k, v in row.items()), flush=True)
    return row


def main(argv=None) -> int:
    import torch
    import transformers

    import flax_data2vec as fd
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="asr-eval,asr-10s,text",
                   help="comma-separated: asr-eval, asr-10s, asr-stages (where the time goes), text")
    p.add_argument("--stage-clips", type=int, default=8, help="clips of 10 s (one batch) for asr-stages")
    args = p.parse_args(argv)
    cases = set(args.cases.split(","))
    args.repeats = 3 if args.repeats == 5 else args.repeats
    info = setup(args)
    bs = 8
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctc = audio_checkpoint(os.path.join(tmp, "ctc"), args.quick)
        ours = fd.pipeline("automatic-speech-recognition", ctc, batch_size=bs)
        theirs = transformers.pipeline("automatic-speech-recognition", model=ctc, batch_size=bs)
        files = [os.path.join(os.path.dirname(EVAL), json.loads(line)["path"]) for line in open(EVAL)]
        files = files[:16] if args.quick else files
        import soundfile as sf
        clips = [sf.read(f, dtype="float32")[0] for f in files]
        seconds = sum(len(c) for c in clips) / 16000
        if "asr-eval" in cases:
            rows.append(compare(f"ASR eval set ({len(clips)} clips)", "audio-s", seconds, Call(ours, clips),
                                Call(theirs, clips), args.repeats))
        ten = [np.random.default_rng(i).standard_normal(160000).astype(np.float32) * 0.1 for i in range(bs)]
        if "asr-10s" in cases:
            rows.append(compare("ASR 8 x 10 s", "audio-s", 80.0, Call(ours, ten), Call(theirs, ten), args.repeats))
        if "asr-stages" in cases:
            n = args.stage_clips
            rows.append(asr_stages(fd.pipeline("automatic-speech-recognition", ctc, batch_size=n),
                                   transformers.pipeline("automatic-speech-recognition", model=ctc, batch_size=n),
                                   ten[:n], args.repeats))
        if "text" in cases:
            rows += text_cases(tmp, bs, args)
    print(f"torch threads {torch.get_num_threads()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
