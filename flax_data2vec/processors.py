"""transformers' own processors for Data2Vec checkpoints: read them from a checkpoint's directory (or hub repo),
and write them beside an exported model so that both `flax_data2vec.pipeline` and `transformers.pipeline` run it.

Files: `vocab.json` + `tokenizer_config.json` (Wav2Vec2CTCTokenizer) for CTC, the text tokenizer's files,
`preprocessor_config.json` (Wav2Vec2FeatureExtractor) for audio; labels live in config.json's `id2label`.
"""

from __future__ import annotations

import os
import shutil
import tempfile

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
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as e:
        raise FileNotFoundError(f"cannot read a tokenizer from {directory} (looked for tokenizer.json, vocab.json "
                                f"+ merges.txt): {e}; {TEXT_HOW}") from e
    check_text_tokenizer(tokenizer, directory)
    return tokenizer


TEXT_HOW = "save the training tokenizer there with tokenizer.save_pretrained(DIR), or pass tokenizer="


def check_text_tokenizer(tokenizer, directory: str, vocab_size: int | None = None) -> None:
    """Refuse a tokenizer with no vocabulary beyond its special tokens: transformers builds one from a bare
    config.json, and it maps every text to the same ids, so every prediction would be the same."""
    specials = set(tokenizer.all_special_tokens)
    if len(tokenizer) <= len(specials):
        raise FileNotFoundError(f"{directory} has no tokenizer files (tokenizer.json, vocab.json + merges.txt, ...): "
                                f"the tokenizer read from it holds only its {len(tokenizer)} special tokens and "
                                f"would map every text to the same ids; {TEXT_HOW}")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab_size}: ids past it have no embedding; save the model's own tokenizer there")


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


def complete_export(directory: str, module, params, label: str | None = None) -> None:
    """Make an exported Orbax model directory readable by transformers too: model.safetensors beside its
    config.json, and the processor files its task needs (a CTC vocab.json already there gets its tokenizer)."""
    from . import hub
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(directory))) as tmp:
        hub.save_transformers(os.path.join(tmp, "hf"), module, params)
        os.replace(os.path.join(tmp, "hf", "model.safetensors"), os.path.join(directory, "model.safetensors"))
    complete_processors(directory, module, label)


def complete_processors(directory: str, module, label: str | None = None) -> None:
    """Write the processor files `module`'s task needs that `directory` lacks, and check they load: a CTC
    tokenizer config for its vocab.json, the data2vec feature extractor for audio; a text model must have its
    tokenizer there already. Raises, naming what is missing (`label`: the directory's name in messages, for a
    temp directory), rather than leave an export that predicts garbage."""
    name, config, label = type(module).__name__, module.config, label or directory
    audio = not name.startswith("Data2VecText")
    if name.endswith("ForCTC"):
        if not os.path.isfile(os.path.join(directory, "vocab.json")):
            raise FileNotFoundError(f"{label} has no vocab.json, so the exported CTC model's outputs cannot be "
                                    "turned into text; write it with flax_data2vec.processors.save_ctc_processor"
                                    "(DIR, tokens) before exporting")
        if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
            save_ctc_processor(directory)
        tokenizer = ctc_tokenizer(directory)
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"{label}/vocab.json has {len(tokenizer)} tokens but the CTC head has "
                             f"{config.vocab_size} outputs")
    if audio and not os.path.isfile(os.path.join(directory, "preprocessor_config.json")):
        save_feature_extractor(directory)
    if not audio:
        try:
            tokenizer = text_tokenizer(directory)
        except FileNotFoundError as e:
            raise FileNotFoundError(str(e).replace(directory, label)) from None
        check_text_tokenizer(tokenizer, label, config.vocab_size)


# written by the model's own save, never copied from a source checkpoint (nor are weight files)
MODEL_FILES = frozenset({"config.json", "flax_data2vec.json"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".msgpack", ".h5", ".pt")


def copy_processor_files(src: str, dst: str) -> list[str]:
    """Copy the processor files of checkpoint `src` into `dst` (every top-level file but the model's own: a
    tokenizer may have any file names); returns the names copied."""
    copied = []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if (entry.is_file() and entry.name not in MODEL_FILES and not entry.name.endswith(WEIGHT_SUFFIXES)
                and not entry.name.startswith(".")):
            shutil.copyfile(entry.path, os.path.join(dst, entry.name))
            copied.append(entry.name)
    return copied
