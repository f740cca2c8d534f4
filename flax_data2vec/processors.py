"""transformers' own processors for Data2Vec checkpoints: read them from a checkpoint's directory (or hub repo),
and write them beside an exported model so that both `flax_data2vec.pipeline` and `transformers.pipeline` run it.

Files: `vocab.json` + `tokenizer_config.json` (Wav2Vec2CTCTokenizer) for CTC, the text tokenizer's files,
`preprocessor_config.json` (Wav2Vec2FeatureExtractor) for audio; labels live in config.json's `id2label`.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# what a directory may hold besides the model; copied along when a checkpoint is converted
PROCESSOR_FILES = ("vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json", "merges.txt", "preprocessor_config.json", "processor_config.json")
CTC_SPECIALS = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                    word_delimiter_token="|")


def feature_extractor(directory: str | None, given=None, sampling_rate: int = 16000):
    """The checkpoint's feature extractor; where it has none, data2vec-audio's (16 kHz, normalised, with mask)."""
    if given is not None:
        return given
    from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor
    if directory is not None:
        local = os.path.isdir(directory)
        if not local or os.path.isfile(os.path.join(directory, "preprocessor_config.json")):
            try:
                return AutoFeatureExtractor.from_pretrained(directory)
            except OSError:
                if local:
                    raise
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sampling_rate, padding_value=0.0,
                                    do_normalize=True, return_attention_mask=True)


def ctc_tokenizer(directory: str | None, given=None):
    """The CTC tokenizer of a checkpoint; a clear error naming the missing file when there is none."""
    if given is not None:
        return given
    how = ("write one with `flax_data2vec.processors.save_ctc_processor(DIR, tokens)` (tokens: the "
           "vocabulary in id order, '<pad>' first as the CTC blank) or `transformers.Wav2Vec2CTCTokenizer("
           "'vocab.json').save_pretrained(DIR)`, or pass tokenizer=")
    if directory is None:
        raise ValueError(f"a CTC model given as a (module, params) pair needs tokenizer=: {how}")
    if os.path.isdir(directory) and not os.path.isfile(os.path.join(directory, "vocab.json")):
        raise FileNotFoundError(f"{directory} has no vocab.json, so its CTC outputs cannot be turned into text; {how}")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read the CTC tokenizer of {directory}: {e}; {how}") from e


def text_tokenizer(directory: str | None, given=None):
    """The checkpoint's text tokenizer (AutoTokenizer, fast when available, for character offsets)."""
    if given is not None:
        return given
    if directory is None:
        raise ValueError("a text model given as a (module, params) pair needs tokenizer=")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as e:
        raise FileNotFoundError(f"cannot read a tokenizer from {directory} (looked for tokenizer.json, vocab.json "
                                f"+ merges.txt): {e}; save one there with tokenizer.save_pretrained(DIR), or pass "
                                "tokenizer=") from e


def save_ctc_processor(directory: str, tokens: list[str] | None = None, sampling_rate: int = 16000) -> None:
    """vocab.json (unless `tokens` is None and it exists), tokenizer config and preprocessor_config.json for CTC."""
    import json

    from transformers import Wav2Vec2CTCTokenizer
    vocab = os.path.join(directory, "vocab.json")
    if tokens is not None:
        with open(vocab, "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False, indent=1)
    Wav2Vec2CTCTokenizer(vocab, **CTC_SPECIALS).save_pretrained(directory)
    save_feature_extractor(directory, sampling_rate)


def save_feature_extractor(directory: str, sampling_rate: int = 16000) -> None:
    feature_extractor(None, sampling_rate=sampling_rate).save_pretrained(directory)


def complete_export(directory: str, module, params) -> None:
    """Make an exported Orbax model directory readable by transformers too: model.safetensors beside its
    config.json, and the processor files its task needs (a CTC vocab.json already there gets its tokenizer)."""
    from . import hub
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(directory))) as tmp:
        hub.save_transformers(os.path.join(tmp, "hf"), module, params)
        os.replace(os.path.join(tmp, "hf", "model.safetensors"), os.path.join(directory, "model.safetensors"))
    name = type(module).__name__
    if name == "Data2VecAudioForCTC" and os.path.isfile(os.path.join(directory, "vocab.json")):
        save_ctc_processor(directory)
    elif name.startswith("Data2VecAudio"):
        save_feature_extractor(directory)


def copy_processor_files(src: str, dst: str) -> list[str]:
    """Copy the processor files of checkpoint `src` into `dst`; returns the names copied."""
    copied = []
    for name in PROCESSOR_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied
