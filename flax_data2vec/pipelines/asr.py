"""`automatic-speech-recognition` for Data2VecAudioForCTC: transformers' inputs, chunking and outputs.

Long audio is cut as transformers' `chunk_iter` cuts it (chunks of `chunk_length_s` overlapping by
`stride_length_s` each side); every chunk's per-frame output loses its strides and the rest is concatenated,
which is exact for CTC (transformers#14896). Chunks of all inputs are batched together in bucketed shapes.
Decoding: greedy (argmax on device, the checkpoint's CTC tokenizer on the host) or pyctcdecode's beam search
with an optional kenlm n-gram and hotwords.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .. import processors
from ..audio import conv_output_lengths
from .audio import AudioPipeline
from .base import Model, length_batches, run_overlapped
from .inputs import check_long_enough

LM_EXTRA = ("pip install --no-deps pyctcdecode pygtrie (its numpy<2 pin would downgrade jax); "
            "pip install kenlm for an n-gram LM")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One chunk of one input: its samples and transformers' stride triple (samples, left, right)."""

    item: int
    samples: np.ndarray
    stride: tuple[int, int, int] | None


def chunk_pieces(item: int, x: np.ndarray, chunk_len: int, left: int, right: int) -> list[Piece]:
    """transformers' `chunk_iter` arithmetic: chunks start every chunk_len - left - right samples."""
    step = chunk_len - left - right
    pieces = []
    for start in range(0, len(x), step):
        end = start + chunk_len
        chunk = x[start:end]
        is_last = end >= len(x)
        stride = (len(chunk), 0 if start == 0 else left, 0 if is_last else right)
        if len(chunk) > stride[1]:
            pieces.append(Piece(item, chunk, stride))
        if is_last:
            break
    return pieces


def kept_frames(values: np.ndarray, stride: tuple[int, int, int] | None, align_to: int) -> np.ndarray:
    """The frames of one chunk that survive stitching (transformers' `rescale_stride` then slice)."""
    if stride is None:
        return values
    n, left, right = stride
    tokens = int(round(n / align_to))
    left, right = int(round(left / n * tokens)), int(round(right / n * tokens))
    return values[left:tokens - right]


def build_decoder(tokenizer, lm: str | None = None, **options):
    """A pyctcdecode beam-search decoder over the CTC tokenizer's vocabulary (blank '<pad>', '|' = space)."""
    try:
        from pyctcdecode import build_ctcdecoder
    except ImportError as e:
        raise ImportError(f"beam-search decoding needs pyctcdecode: {LM_EXTRA}") from e
    if lm is not None:
        try:
            import kenlm  # noqa: F401
        except ImportError as e:
            raise ImportError(f"decoding with the n-gram LM {lm} needs kenlm: {LM_EXTRA}") from e
    vocab = tokenizer.get_vocab()
    labels = sorted(vocab, key=vocab.get)
    delimiter = getattr(tokenizer, "word_delimiter_token", "|")
    labels = ["" if t == tokenizer.pad_token else " " if t == delimiter else t for t in labels]
    return build_ctcdecoder(labels, kenlm_model_path=lm, **options)


class AutomaticSpeechRecognitionPipeline(AudioPipeline):
    """`pipeline("automatic-speech-recognition", model)(inputs, chunk_length_s=, return_timestamps=)`."""

    task = "automatic-speech-recognition"
    architectures = ("Data2VecAudioForCTC",)

    def __init__(self, model: Model, *, tokenizer=None, feature_extractor=None, decoder=None, lm: str | None = None,
                 decoder_options: dict | None = None, **kw):
        self.tokenizer = processors.ctc_tokenizer(model.directory, tokenizer)
        if decoder is None and (lm is not None or decoder_options is not None):
            decoder = build_decoder(self.tokenizer, lm, **(decoder_options or {}))
        self.decoder = decoder
        super().__init__(model, feature_extractor=feature_extractor, **kw)
        self.align_to = self.config.inputs_to_logits_ratio

    def forward_fn(self, params, x, mask):
        logits = self.apply(params, x, mask).logits
        if self.decoder is not None:  # pyctcdecode scores log-probabilities
            return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def run(self, items: list, options: dict) -> list:
        timestamps = options.pop("return_timestamps", None)
        chunk_s, stride_s = options.pop("chunk_length_s", 0), options.pop("stride_length_s", None)
        decoder_kwargs = options.pop("decoder_kwargs", None) or {}
        if options:
            raise TypeError(f"unknown automatic-speech-recognition options: {sorted(options)}")
        if timestamps not in (None, False, "char", "word"):
            raise ValueError(f"return_timestamps must be 'char' or 'word', got {timestamps!r}")
        if timestamps == "char" and self.decoder is not None:
            raise ValueError("beam-search decoding gives word timestamps only: use return_timestamps='word'")
        waves = self.waveforms(items)
        pieces, longest = self._pieces(waves, chunk_s, stride_s)
        for p in pieces:
            check_long_enough(p.samples, self.config, f"input {p.item}" + (" (a chunk of it)" if p.stride else ""))
        batches = [[pieces[i] for i in b] for b in length_batches([len(p.samples) for p in pieces], self.batch_size)]
        # chunks pad to the chunk length at most: full chunks pad nothing, and all share one shape
        prepare = lambda batch: (batch, self.prepare([p.samples for p in batch], longest))  # noqa: E731
        done = run_overlapped(batches, prepare, lambda b: self.forward(*b[1]), self._finish, self.stats)
        kept = {id(p): v for batch in done for p, v in batch}
        per_item: list[list[np.ndarray]] = [[] for _ in items]
        for p in pieces:  # chunk order
            per_item[p.item].append(kept[id(p)])
        return [self._decode(np.concatenate(v, axis=0), timestamps, decoder_kwargs) for v in per_item]

    def _pieces(self, waves: list[np.ndarray], chunk_s: float, stride_s) -> tuple[list[Piece], int | None]:
        """The pieces to run, and the chunk length in samples (None without chunking)."""
        if not chunk_s:
            return [Piece(i, x, None) for i, x in enumerate(waves)], None
        stride_s = chunk_s / 6 if stride_s is None else stride_s
        left_s, right_s = (stride_s, stride_s) if isinstance(stride_s, (int, float)) else stride_s
        to_samples = lambda s: int(round(s * self.sampling_rate / self.align_to) * self.align_to)  # noqa: E731
        chunk_len, left, right = to_samples(chunk_s), to_samples(left_s), to_samples(right_s)
        if chunk_len < left + right:
            raise ValueError(f"chunk_length_s ({chunk_s}) must be longer than the two strides ({left_s} + {right_s})")
        return [p for i, x in enumerate(waves) for p in chunk_pieces(i, x, chunk_len, left, right)], chunk_len

    def _finish(self, prepared, out):
        batch = prepared[0]
        out = self.forward.fetch(out)
        frames = conv_output_lengths(self.config, np.array([len(p.samples) for p in batch]))
        return [(p, kept_frames(out[i, :frames[i]], p.stride, self.align_to)) for i, p in enumerate(batch)]

    def _decode(self, values: np.ndarray, timestamps, decoder_kwargs: dict) -> dict:
        scale = self.align_to / self.sampling_rate
        if self.decoder is not None:
            text, _, words, *_ = self.decoder.decode_beams(values, **decoder_kwargs)[0]
            out = {"text": text}
            if timestamps:
                out["chunks"] = [{"text": w, "timestamp": (float(s * scale), float(e * scale))} for w, (s, e) in words]
            return out
        out = {"text": self.tokenizer.decode(values)}
        if timestamps:
            kind = "char" if timestamps == "char" else "word"
            offsets = self.tokenizer.decode(values, **{f"output_{kind}_offsets": True})[f"{kind}_offsets"]
            out["chunks"] = [{"text": o[kind], "timestamp": (float(o["start_offset"] * scale),
                                                                float(o["end_offset"] * scale))}
                             for o in offsets]
        return out
