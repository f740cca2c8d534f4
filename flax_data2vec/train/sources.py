"""Where training examples come from: local manifests and text files, or Hugging Face `datasets`.

`--train-data` / `--eval-data` take a path (an audio manifest, a text file) or `hf:NAME[:CONFIG][@SPLIT]`,
e.g. `hf:openslr/librispeech_asr:clean@train.100`, `hf:nyu-mll/glue:sst2@validation` or
`hf:/data/my_dataset@train[:90%]` (a folder of data files, or one written by `save_to_disk`). Either way
the result is a `Split`: plain row dicts (`path` or an in-dataset audio reference, `text`, `text_pair`,
`label`) that the datasets in `data.py` turn into batches. Hugging Face audio is decoded here with
soundfile from the stored bytes (no torchcodec), and all lengths are read from headers up front so that
batches can be planned without decoding.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence

import numpy as np
import soundfile as sf
from tqdm import tqdm

from . import data as data_lib

HF_PREFIX = "hf:"
EVAL_SPLITS = ("validation", "valid", "dev", "test")  # tried in order when no eval split is named
AUDIO_COLUMNS = ("audio", "speech", "file", "path")
TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text", "content")
LABEL_COLUMNS = ("label", "labels", "intent", "class", "category")
TOKEN_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("ner_tags", "tags", "pos_tags", "labels", "chunk_tags")


@dataclasses.dataclass
class Split:
    """Rows of one split plus what is known about them (class names in dataset order, a description)."""

    rows: list[dict]
    name: str
    label_names: list[str] | None = None

    def holdout(self, every: int = 20) -> tuple[Split, Split]:
        """(train, eval): every `every`-th row held out for evaluation, deterministically."""
        train = [r for i, r in enumerate(self.rows) if i % every]
        held = [r for i, r in enumerate(self.rows) if i % every == 0]
        if not train or not held:
            raise ValueError(f"{self.name} has {len(self.rows)} examples: too few to hold out an eval set; "
                             "pass --eval-data")
        return (Split(train, f"{self.name} (all but every {every}th)", self.label_names),
                Split(held, f"{self.name} (every {every}th, held out)", self.label_names))


@dataclasses.dataclass(frozen=True)
class Columns:
    """Which dataset columns hold the audio, the text (or "a,b" for a sentence pair) and the label; '' = guess."""

    audio: str = ""
    text: str = ""
    label: str = ""


# ----------------------------------------------------------------------------- hf: specs

def is_hf(spec: str) -> bool:
    return spec.startswith(HF_PREFIX)


@dataclasses.dataclass(frozen=True)
class HFSpec:
    """`hf:NAME[:CONFIG][@SPLIT]` parsed; NAME is a hub id or a local folder."""

    name: str
    config: str | None = None
    split: str | None = None

    @classmethod
    def parse(cls, spec: str) -> HFSpec:
        body = spec[len(HF_PREFIX):] if is_hf(spec) else spec
        body, _, split = body.partition("@")
        name, _, config = body.partition(":")
        if not name:
            raise ValueError(f"{spec!r}: expected hf:NAME[:CONFIG][@SPLIT], "
                             "e.g. hf:openslr/librispeech_asr:clean@train.100")
        return cls(name, config or None, split or None)

    def __str__(self) -> str:
        config, split = (f":{self.config}" if self.config else ""), (f"@{self.split}" if self.split else "")
        return HF_PREFIX + self.name + config + split

    @property
    def on_disk(self) -> bool:
        """A folder written by `Dataset(Dict).save_to_disk` (read with load_from_disk)."""
        return any(os.path.isfile(os.path.join(self.name, f)) for f in ("dataset_dict.json", "state.json"))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("hf: data needs the Hugging Face `datasets` package: pip install datasets "
                          "(or pip install 'flax_data2vec[hf]')") from None
    datasets.disable_progress_bars()  # keep the training log readable
    return datasets


def split_names(spec: HFSpec) -> list[str]:
    """The dataset's split names (without downloading the data where the hub allows)."""
    datasets = _datasets()
    if spec.on_disk:
        loaded = datasets.load_from_disk(spec.name)
        return list(loaded) if isinstance(loaded, datasets.DatasetDict) else ["train"]
    try:
        return list(datasets.get_dataset_split_names(spec.name, spec.config))
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all mean "cannot list it"
        raise ValueError(f"cannot read dataset {spec.name!r}"
                         f"{f' (config {spec.config!r})' if spec.config else ''}: {e}") from None


def load_split(spec: HFSpec, split: str):
    """One split as a map-style `datasets.Dataset` (slices such as `train[:10%]` allowed)."""
    datasets = _datasets()
    if spec.on_disk:
        loaded = datasets.load_from_disk(spec.name)
        if not isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.DatasetDict({"train": loaded})
        try:
            pieces = datasets.ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in loaded.items()})
        except ValueError as e:
            raise ValueError(f"{spec.name}: bad split {split!r} ({e}); splits: {', '.join(loaded)}") from None
        parts = [loaded[a.splitname].select(range(a.from_, a.to)) for a in pieces]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the message is what matters
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot load {HFSpec(spec.name, spec.config, split)}: {msg}") from None
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{spec} is not a map-style dataset (got {type(ds).__name__}); streaming datasets "
                         "cannot be resumed exactly, so save a subset with save_to_disk and pass that folder")
    return ds


def _pick(ds, wanted: str, guesses: Sequence[str], what: str, flag: str, feature_type: str | None = None):
    """The column the user named, else one of the dataset's typed columns, else the first usual name."""
    columns = list(ds.column_names)
    if wanted:
        missing = [c for c in wanted.split(",") if c not in columns]
        if missing:
            raise ValueError(f"{what} column {', '.join(missing)} not in the dataset; columns: {', '.join(columns)}")
        return wanted
    if feature_type is not None:
        typed = [c for c, f in ds.features.items() if type(f).__name__ == feature_type]
        if typed:
            return typed[0]
    for g in guesses:
        if g in columns:
            return g
    raise ValueError(f"no {what} column found among {', '.join(columns)}; name it with {flag}")


# ----------------------------------------------------------------------------- hf audio

class HFAudioColumn:
    """Random access to one audio column of a `datasets.Dataset`, decoded with soundfile.

    The column is read undecoded (`Audio(decode=False)`: stored bytes and/or a file path) or is a
    plain string column of file paths; either way this class does the decoding, mono mixdown and
    resampling exactly as for manifest files.
    """

    def __init__(self, ds, column: str):
        datasets = _datasets()
        feature = ds.features[column]
        if isinstance(feature, datasets.Audio):
            ds = ds.cast_column(column, datasets.Audio(decode=False))
        elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"audio column {column!r} has type {feature}; expected an Audio feature or file paths")
        self.ds, self.column = ds.select_columns([column]), column

    def _entry(self, value, index: int):
        """(a soundfile-readable object, a name for messages) for one stored value."""
        if isinstance(value, str):
            return value, value
        if isinstance(value, dict) and value.get("bytes"):
            return io.BytesIO(value["bytes"]), value.get("path") or f"row {index}"
        if isinstance(value, dict) and value.get("path"):
            return value["path"], value["path"]
        raise ValueError(f"audio column {self.column!r} row {index} holds no bytes and no path")

    def lengths(self, target_sr: int) -> np.ndarray:
        """Samples per row after resampling to target_sr, from headers; unreadable/missing rows all named.

        When every row embeds its bytes, the lengths are cached by the dataset's fingerprint under
        `$FLAX_DATA2VEC_CACHE/lengths`, so a restarted (e.g. preempted) job on a large dataset does not read
        every header again.
        """
        cache = self._cache_path(target_sr)
        if cache and os.path.isfile(cache):
            cached = np.load(cache)
            if len(cached) == len(self.ds):
                return cached
        out, bad, embedded = [], [], True
        rows = tqdm(self._iter_values(), total=len(self.ds), desc="audio lengths", unit="row",
                    disable=len(self.ds) < 20_000, mininterval=5)
        for i, value in rows:
            src, name = self._entry(value, i)
            embedded &= not isinstance(src, str)
            try:
                if isinstance(src, str) and not os.path.isfile(src):
                    raise FileNotFoundError("file not found")
                info = sf.info(src)
                out.append(data_lib._resampled_length(info.frames, info.samplerate, target_sr))
            except (RuntimeError, OSError) as e:
                bad.append(f"{name} ({e})")
                out.append(0)
        if bad:
            raise ValueError(f"{len(bad)} of {len(out)} audio rows cannot be read: {data_lib._missing_list(bad)}")
        lengths = np.array(out, np.int64)
        if cache and embedded:  # files outside the dataset could change under the same fingerprint
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp.npy"
            np.save(tmp, lengths)
            os.replace(tmp, cache)  # atomic: concurrent hosts write the same bytes
        return lengths

    def _cache_path(self, target_sr: int) -> str | None:
        fingerprint = getattr(self.ds, "_fingerprint", None)
        if not fingerprint:
            return None
        from ..hub import cache_dir
        return os.path.join(cache_dir(), "lengths", f"{fingerprint}-{self.column}-{target_sr}.npy")

    def _iter_values(self):
        n = 0
        for batch in self.ds.iter(batch_size=256):
            for value in batch[self.column]:
                yield n, value
                n += 1

    def read(self, index: int, target_sr: int) -> np.ndarray:
        src, name = self._entry(self.ds[index][self.column], index)
        return data_lib.load_audio(src, target_sr, name=name)


# ----------------------------------------------------------------------------- readers

def _label_names(ds, column: str) -> list[str] | None:
    feature = ds.features[column]
    feature = getattr(feature, "feature", feature)  # a list of ClassLabel (token tags) names its classes too
    return list(feature.names) if type(feature).__name__ == "ClassLabel" else None


def _hf_tagged_rows(ds, name: str, columns: Columns) -> Split:
    """Token classification rows {tokens, tags} (tag names) from a words column and a per-word tags column."""
    words = _pick(ds, columns.text, TOKEN_COLUMNS, "tokens", "--text-column")
    typed = [c for c, f in ds.features.items()
             if type(getattr(f, "feature", None)).__name__ == "ClassLabel" and c != words]
    tags = columns.label or (typed[0] if typed else "")
    tags = _pick(ds, tags, TAG_COLUMNS, "tags", "--label-column")
    names = _label_names(ds, tags)
    rows = []
    for n, (w, t) in enumerate(zip(ds[words], ds[tags])):
        if names is not None and any(not 0 <= i < len(names) for i in t):  # names[-1] would be the last class
            bad = next(i for i in t if not 0 <= i < len(names))
            raise ValueError(f"{name} row {n}: tag id {bad} in column {tags!r} is outside its {len(names)} classes "
                             f"[0, {len(names)})")
        rows.append({"tokens": [str(x) for x in w], "tags": [names[i] if names is not None else str(i) for i in t]})
    return Split(rows, name, names)


def qa_row(row: dict, where: str) -> dict:
    """A SQuAD-style row {question, context, answers: {text: [...], answer_start: [...]}} checked: every answer
    must be the context's text at its answer_start."""
    missing = [k for k in ("question", "context", "answers") if k not in row]
    if missing:
        raise ValueError(f"{where}: question answering needs 'question', 'context' and 'answers'; no {missing}")
    texts, starts = list(row["answers"]["text"]), [int(s) for s in row["answers"]["answer_start"]]
    if not texts or len(texts) != len(starts):
        raise ValueError(f"{where}: 'answers' needs as many 'text' as 'answer_start' entries, at least one")
    for text, start in zip(texts, starts):
        if row["context"][start:start + len(text)] != text:
            raise ValueError(f"{where}: answer {text!r} is not the context's text at answer_start {start}")
    return {"question": str(row["question"]), "context": str(row["context"]),
            "answers": {"text": texts, "answer_start": starts}}


def _qa_rows(spec: str, ds=None) -> list[dict]:
    """Question-answering rows from a JSONL file of SQuAD-style objects, or from an hf: dataset `ds`."""
    if ds is not None:
        return [qa_row(r, f"{spec} row {i}") for i, r in enumerate(ds)]
    if not spec.endswith((".jsonl", ".json")):
        raise ValueError(f"{spec}: question answering reads JSONL rows {{question, context, answers}} or hf: data")
    with open(spec, encoding="utf-8") as f:
        return [qa_row(json.loads(line), f"{spec} line {n}") for n, line in enumerate(f, 1) if line.strip()]


def _hf_rows(spec: HFSpec, split: str, modality: str, columns: Columns, need_text: bool,
             need_label: bool, target_sr: int, tagged: bool = False, qa: bool = False) -> Split:
    ds = load_split(spec, split)
    name = str(HFSpec(spec.name, spec.config, split))
    if len(ds) == 0:
        raise ValueError(f"{name} has no examples")
    if tagged:
        return _hf_tagged_rows(ds, name, columns)
    if qa:
        return Split(_qa_rows(name, ds), name)
    rows: list[dict] = [{} for _ in range(len(ds))]
    label_names = None
    if need_label:
        col = _pick(ds, columns.label, LABEL_COLUMNS, "label", "--label-column", "ClassLabel")
        label_names = _label_names(ds, col)
        for row, value in zip(rows, ds[col]):
            if value is None or (label_names is not None and value < 0):
                raise ValueError(f"{name}: a row has no label in column {col!r} (unlabelled test split?)")
            row["label"] = label_names[value] if label_names is not None else value
    if need_text:
        col = _pick(ds, columns.text, TEXT_COLUMNS, "text", "--text-column")
        names = col.split(",")
        if len(names) > 2 or (len(names) == 2 and modality == "audio"):
            raise ValueError(f"--text-column takes one column{' or a pair a,b' if modality == 'text' else ''}, "
                             f"got {col!r}")
        for key, c in zip(("text", "text_pair"), names):
            for row, value in zip(rows, ds[c]):
                row[key] = "" if value is None else str(value)
    if modality == "audio":
        col = _pick(ds, columns.audio, AUDIO_COLUMNS, "audio", "--audio-column", "Audio")
        audio = HFAudioColumn(ds, col)
        for i, (row, n) in enumerate(zip(rows, audio.lengths(target_sr))):
            row.update(audio=audio, index=i, frames=int(n))
    elif not need_label:  # unlabelled text (MLM, pre-training): blank lines carry nothing
        rows = [r for r in rows if r["text"].strip()]
        if not rows:
            raise ValueError(f"{name} has no non-empty text in column {columns.text or 'text'!r}")
    return Split(rows, name, label_names)


def read_source(spec: str, modality: str, *, split: str | None = None, columns: Columns = Columns(),
                need_text: bool = True, need_label: bool = False, target_sr: int = 16000,
                tagged: bool = False, qa: bool = False) -> Split:
    """Rows from a path (manifest for audio, text file for text) or an `hf:` spec; `split` is the
    split to read when the spec names none. `tagged`: token classification rows {tokens, tags};
    `qa`: question answering rows {question, context, answers}."""
    if is_hf(spec):
        parsed = HFSpec.parse(spec)
        return _hf_rows(parsed, parsed.split or split or "train", modality, columns, need_text, need_label,
                        target_sr, tagged, qa)
    if qa:
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"question-answering file not found: {spec}")
        rows = _qa_rows(spec)
        if not rows:
            raise ValueError(f"{spec} has no examples")
        return Split(rows, spec)
    if modality == "audio":
        return Split(data_lib.read_manifest(spec), spec)
    rows = data_lib.load_text_lines(spec)
    if tagged and not all("tokens" in r and "tags" in r for r in rows):
        raise ValueError(f"{spec}: token classification needs JSONL rows with 'tokens' and 'tags' lists")
    return Split(rows, spec)


def _eval_split_spec(spec_text: str, required: bool) -> str:
    """`spec_text` with its first split among EVAL_SPLITS named ('' if none and not required)."""
    spec = HFSpec.parse(spec_text)
    names = split_names(spec)
    split = next((s for s in EVAL_SPLITS if s in names), None)
    if split is None:
        if required:
            raise ValueError(f"{spec_text}: no split among {', '.join(EVAL_SPLITS)} (has {', '.join(names)}); "
                             "name one with @SPLIT")
        return ""
    return str(HFSpec(spec.name, spec.config, split))


def train_eval_sources(train_spec: str, eval_spec: str, modality: str, *, default_eval: str = "",
                       columns: Columns = Columns(), need_text: bool = True, need_label: bool = False,
                       target_sr: int = 16000, tagged: bool = False, qa: bool = False) -> tuple[Split, Split]:
    """(train, eval) sources. Eval is `eval_spec` if given (an `hf:` one without a split: its first split
    among EVAL_SPLITS); else, for an `hf:` train set without a named split, its first split among
    EVAL_SPLITS; else `default_eval`; else every 20th train row held out."""
    kw = dict(columns=columns, need_text=need_text, need_label=need_label, target_sr=target_sr, tagged=tagged, qa=qa)
    train = read_source(train_spec, modality, split="train", **kw)
    if not eval_spec and is_hf(train_spec) and HFSpec.parse(train_spec).split is None:
        eval_spec = _eval_split_spec(train_spec, required=False)
    elif is_hf(eval_spec) and HFSpec.parse(eval_spec).split is None:
        eval_spec = _eval_split_spec(eval_spec, required=True)
    eval_spec = eval_spec or default_eval
    if not eval_spec:
        return train.holdout()
    return train, read_source(eval_spec, modality, **kw)


def label_map(train: Split) -> data_lib.LabelMap:
    """Class ids in the dataset's own order when it declares class names, else sorted label strings
    (per-word `tags` for token classification)."""
    if train.label_names is not None:
        return data_lib.LabelMap(train.label_names)
    if train.rows and "tags" in train.rows[0]:
        return data_lib.LabelMap.from_labels(t for r in train.rows for t in r["tags"])
    return data_lib.LabelMap.from_labels(r.get("label") for r in train.rows)
