"""Host-side data: manifests, audio/text loading, vocabularies and the datasets batches are made of.

Everything here is plain numpy so it runs on the host (in Grain's worker processes) while the accelerator
trains. A dataset has `lengths` (known before decoding, to plan batches), `load(i, rng)`, `pad_value` and
optional `label_lengths`; input_pipeline.py turns it into bucketed, resumable batches.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import soundfile as sf

from .input_pipeline import IGNORE_INDEX


def _missing_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


# ----------------------------------------------------------------------------- manifests & audio

def read_manifest(path: str, check_files: bool = True) -> list[dict]:
    """Reads a JSONL or TSV manifest of audio files; `path`s come back absolute.

    JSONL/JSON: one object per line with a `path` key (plus e.g. `text`, `label`). TSV: a header
    row naming a `path` column, or the fairseq layout (first line a root folder, then
    `relpath<TAB>num_frames` rows, with transcripts taken from a sibling `.wrd` file if present).
    Relative paths resolve against the manifest's folder. All missing files are reported at once.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\r\n") for ln in f]
    rows: list[dict] = []
    if path.endswith(".json") and lines and lines[0].lstrip().startswith("["):
        rows = json.loads("\n".join(lines))  # a JSON array of objects
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"manifest {path} must be a JSON array of objects")
    elif path.endswith((".jsonl", ".json")):
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"manifest {path} line {n} is not valid JSON: {e}") from None
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"manifest {path} line {n} is not a JSON object")
    elif path.endswith(".tsv"):
        lines = [ln for ln in lines if ln.strip()]
        if lines and "path" not in lines[0].split("\t") and len(lines[0].split("\t")) == 1:
            base = os.path.join(base, lines[0].strip())  # fairseq: root folder first
            rows = [{"path": p[0], **({"frames": int(p[1])} if len(p) > 1 else {})}
                    for p in (ln.split("\t") for ln in lines[1:])]
            wrd = os.path.splitext(path)[0] + ".wrd"
            if os.path.isfile(wrd):
                with open(wrd, encoding="utf-8") as f:
                    texts = [t.strip() for t in f.read().splitlines()]
                if len(texts) != len(rows):
                    raise ValueError(f"{wrd} has {len(texts)} lines but {path} has {len(rows)} entries")
                for row, text in zip(rows, texts):
                    row["text"] = text
        elif lines:
            header = lines[0].split("\t")
            rows = [dict(zip(header, ln.split("\t"))) for ln in lines[1:]]
    else:
        raise ValueError(f"manifest {path}: unknown format (expected .jsonl, .json or .tsv)")
    if not rows:
        raise ValueError(f"manifest {path} has no entries")
    for n, row in enumerate(rows, 1):
        if not row.get("path"):
            raise ValueError(f"manifest {path} entry {n} has no 'path' field: {row}")
        row["path"] = os.path.normpath(os.path.join(base, row["path"]))
    if check_files:
        missing = [r["path"] for r in rows if not os.path.isfile(r["path"])]
        if missing:
            raise FileNotFoundError(f"manifest {path}: {len(missing)} of {len(rows)} audio files are "
                                    f"missing: {_missing_list(missing)}")
    return rows


def _resampled_length(frames: int, sr: int, target_sr: int) -> int:
    g = math.gcd(sr, target_sr)
    return -(-frames * (target_sr // g) // (sr // g))  # resample_poly's output length


def audio_length(path: str, target_sr: int = 16000) -> int:
    """Number of samples `load_audio(path, target_sr)` returns, read from the header only."""
    try:
        info = sf.info(path)
    except (RuntimeError, OSError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise ValueError(f"cannot read audio file {path}: {e}") from None
    return _resampled_length(info.frames, info.samplerate, target_sr)


def load_audio(source, target_sr: int = 16000, name: str | None = None) -> np.ndarray:
    """Decodes an audio file (a path or a binary file object) to mono float32 at target_sr
    (channels averaged, polyphase resampling); `name` labels it in errors."""
    name = name or str(source)
    if isinstance(source, str) and not os.path.isfile(source):
        raise FileNotFoundError(f"audio file not found: {source}")
    try:
        x, sr = sf.read(source, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise ValueError(f"cannot read audio file {name}: {e}") from None
    if x.shape[0] == 0:
        raise ValueError(f"audio file {name} is empty")
    check_finite_audio(x, sr, name)
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if sr != target_sr:
        from scipy.signal import resample_poly
        g = math.gcd(sr, target_sr)
        x = resample_poly(x, target_sr // g, sr // g)
    return np.ascontiguousarray(x, dtype=np.float32)


def check_finite_audio(x: np.ndarray, sr: int, name: str) -> None:
    """NaN or inf samples would make the step's loss NaN (a skipped step, a nan eval_loss) without saying where."""
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.argmax(bad.any(axis=1) if bad.ndim > 1 else bad))
        raise ValueError(f"audio file {name} holds {int(bad.sum())} non-finite samples (NaN or inf), the first at "
                         f"{first / sr:.3f} s; repair the file or remove it from the data")


def load_row_audio(row: dict, target_sr: int = 16000) -> np.ndarray:
    """The audio of one example row: a file `path`, or `audio`+`index` into a Hugging Face dataset."""
    if "path" in row:
        return load_audio(row["path"], target_sr)
    return row["audio"].read(row["index"], target_sr)


def normalize_audio(x: np.ndarray, length: int | None = None) -> np.ndarray:
    """Zero mean, unit variance over x[:length] (samples past it become 0), exactly like
    transformers' Wav2Vec2FeatureExtractor(do_normalize=True): (x - mean) / sqrt(var + 1e-7)."""
    x = np.asarray(x, dtype=np.float32)
    valid = x[:length] if length is not None else x
    out = ((x - valid.mean()) / np.sqrt(valid.var() + 1e-7)).astype(np.float32)
    if length is not None:
        out[length:] = 0.0
    return out


# ----------------------------------------------------------------------------- vocabularies

class CharVocab:
    """Character vocabulary for CTC in the wav2vec2 layout: <pad>(=CTC blank)=0, <s>, </s>, <unk>, |."""

    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "|")
    pad_id, bos_id, eos_id, unk_id, delimiter_id = 0, 1, 2, 3, 4

    def __init__(self, chars: Iterable[str]):
        chars = [c for c in dict.fromkeys(chars) if c not in self.SPECIALS and c != " "]
        self.tokens = list(self.SPECIALS) + chars
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharVocab:
        """Vocabulary of every character in texts (space becomes the `|` delimiter), sorted."""
        return cls(sorted({c for t in texts for c in t} - {" "}))

    def __len__(self) -> int:
        return len(self.tokens)

    def check_texts(self, texts: Iterable[str]) -> None:
        """Raises ValueError naming the characters outside the vocabulary and a line using one."""
        unknown: dict[str, str] = {}
        for t in texts:
            for c in set(t) - set(self.index) - {" "}:
                unknown.setdefault(c, t)
        if unknown:
            chars = "".join(sorted(unknown))
            raise ValueError(f"{len(unknown)} characters are not in the vocabulary: {chars!r}; "
                             f"e.g. in {next(iter(unknown.values()))!r}")

    def encode(self, text: str) -> list[int]:
        """Character ids, space -> `|`; unknown characters -> <unk> (use check_texts to forbid)."""
        return [self.index.get("|" if c == " " else c, self.unk_id) for c in text]

    def decode(self, ids: Iterable[int], collapse: bool = True) -> str:
        """Greedy CTC decoding (collapse repeats, drop blanks); collapse=False decodes label ids."""
        out, prev = [], None
        for i in (int(i) for i in ids):
            if collapse and i == prev:
                continue
            prev = i
            if i < 0 or i in (self.pad_id, self.bos_id, self.eos_id) or i >= len(self.tokens):
                continue
            out.append(" " if i == self.delimiter_id else self.tokens[i])
        return " ".join("".join(out).split())

    def save(self, directory: str) -> str:
        """Writes vocab.json (readable by transformers.Wav2Vec2CTCTokenizer); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "vocab.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.index, f, ensure_ascii=False, indent=1)
        return path

    @classmethod
    def load(cls, path: str) -> CharVocab:
        """Reads vocab.json (a folder holding it, or the file); ids must follow the wav2vec2 layout."""
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.json")
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        tokens = sorted(index, key=index.get)
        if tuple(tokens[:5]) != cls.SPECIALS or [index[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError(f"{path} is not a CharVocab vocabulary (expected {cls.SPECIALS} as ids 0-4)")
        return cls(tokens[5:])


class LabelMap:
    """Maps class-label strings to ids 0..n-1 (sorted names unless given in order)."""

    def __init__(self, names: Sequence[str]):
        self.names = [str(n) for n in names]
        self.index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def from_labels(cls, labels: Iterable[Any]) -> LabelMap:
        """Map of the distinct labels, sorted (numerically when all are integers); a missing label is an error."""
        labels = list(labels)
        missing = next((i for i, label in enumerate(labels) if label is None or label == ""), None)
        if missing is not None:
            raise ValueError(f"example {missing} has no label (and {sum(lb is None or lb == '' for lb in labels) - 1} "
                             "more): every training example needs one; drop unlabelled rows or name the label "
                             "column with --label-column")
        names = {str(label) for label in labels}
        numeric = all(n.lstrip("-").isdigit() for n in names)
        return cls(sorted(names, key=int) if numeric else sorted(names))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def check(self, num_labels: int) -> None:
        """Raises ValueError when the map has more classes than a model's num_labels."""
        if len(self.names) > num_labels:
            raise ValueError(f"{len(self.names)} labels but the model has num_labels={num_labels}; "
                             f"labels past it: {_missing_list(self.names[num_labels:])}")

    def encode(self, labels: Iterable[Any]) -> list[int]:
        """Label strings -> ids; unknown labels are all listed in one ValueError."""
        labels = [str(label) for label in labels]
        unknown = sorted({label for label in labels if label not in self.index})
        if unknown:
            raise ValueError(f"{len(unknown)} unknown labels: {_missing_list(unknown)} "
                             f"(known: {_missing_list(self.names)})")
        return [self.index[label] for label in labels]


# ----------------------------------------------------------------------------- text

def load_text_lines(path: str) -> list[dict]:
    """Reads text examples as dicts with `text` (and `label` if present) from .txt, .jsonl or .csv; JSONL
    rows may instead hold pre-split `tokens` with one `tags` entry each (token classification)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            reader = csv.DictReader(f)
            if "text" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: CSV needs a 'text' column, has {reader.fieldnames}")
            rows = [{k: v for k, v in r.items() if k in ("text", "label")} for r in reader]
        elif path.endswith((".jsonl", ".json")):
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not ("text" in row or "tokens" in row):
                        raise ValueError(f"{path} line {n} has no 'text' (or 'tokens') key")
                    rows.append({k: v for k, v in row.items() if k in ("text", "label", "tokens", "tags")})
        else:
            rows = [{"text": ln.strip()} for ln in f if ln.strip()]
    if not rows:
        raise ValueError(f"text file {path} has no examples")
    return rows


def build_small_bpe_tokenizer(corpus: str | Iterable[str], vocab_size: int = 1000, min_frequency: int = 2):
    """Trains a byte-level BPE on a text file (or an iterable of lines) and wraps it as a RoBERTa tokenizer.

    Special ids follow RoBERTa/Data2VecText: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4. Used for
    from-scratch text runs and tests, where no pretrained tokenizer can be downloaded.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    if isinstance(corpus, str):
        with open(corpus, encoding="utf-8") as f:
            corpus = list(f)
    lines = [ln.strip() for ln in corpus if ln.strip()]
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return RobertaTokenizer(vocab=model["vocab"], merges=merges)


# ----------------------------------------------------------------------------- datasets

class AudioDataset:
    """Audio examples from manifest rows or a Hugging Face dataset (sources.py); targets are CTC char ids
    (vocab) or a class id (label_map).

    Lengths come from file headers (or a manifest's `frames`, which must count samples at
    target_sr) so batches can be planned without decoding. Utterances shorter than `min_samples` are
    dropped; longer than `max_samples` they are cropped at a random offset (`crop`, for pre-training)
    or dropped. `dropped` counts all drops, `dropped_short` those below min_samples.
    """

    pad_value = 0.0
    croppable = True  # load(..., length=n) crops: BatchIterator(crop_to_shortest=True)

    def __init__(self, rows: Sequence[dict], *, target_sr: int = 16000, normalize: bool = True,
                 vocab: CharVocab | None = None, label_map: LabelMap | None = None,
                 max_samples: int | None = None, crop: bool = False, min_samples: int = 0):
        self.target_sr, self.normalize = target_sr, normalize
        lengths = np.array([audio_length(r["path"], target_sr) if "frames" not in r else int(r["frames"])
                            for r in rows], dtype=np.int64)
        keep = lengths >= min_samples
        self.dropped_short = int((~keep).sum())
        if max_samples is not None and not crop:
            keep &= lengths <= max_samples
        self.dropped = int((~keep).sum())
        if not keep.any():
            raise ValueError(f"all {len(rows)} utterances dropped: {self.dropped_short} shorter than min_samples="
                             f"{min_samples}, {self.dropped - self.dropped_short} longer than max_samples="
                             f"{max_samples} (pass crop=True to crop them)")
        self.rows, self.full_lengths = [r for r, k in zip(rows, keep) if k], lengths[keep]
        self.lengths = np.minimum(self.full_lengths, max_samples) if max_samples is not None else self.full_lengths
        self.targets: list | None = None
        if vocab is not None:
            texts = [r.get("text") for r in self.rows]
            if any(t is None for t in texts):
                raise ValueError("CTC training needs a 'text' field in every manifest entry")
            vocab.check_texts(texts)
            self.targets = [np.array(vocab.encode(t), np.int32) for t in texts]
        elif label_map is not None:
            self.targets = label_map.encode(r.get("label") for r in self.rows)
        self.label_lengths = (np.array([len(t) for t in self.targets]) if vocab is not None else None)

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int, rng: np.random.Generator | None = None, length: int | None = None) -> dict:
        """Example i, normalized over the whole utterance and then cropped at a random offset (rng; 0 without)
        to `length` samples (default: lengths[i]), in that order as fairseq's RawAudioDataset does."""
        x = load_row_audio(self.rows[i], self.target_sr)[:self.full_lengths[i]]  # header length plans batches
        if self.normalize:
            x = normalize_audio(x)
        length = int(self.lengths[i] if length is None else length)
        if len(x) > length:
            start = int(rng.integers(len(x) - length + 1)) if rng is not None else 0
            x = x[start:start + length]
        out = {"input_values": x}
        if self.targets is not None:
            out["labels"] = self.targets[i]
        return out


class TextDataset:
    """Tokenized text examples wrapped in <s> ... </s> (pairs: <s> a </s></s> b </s>), with optional class ids.

    Lines longer than max_length tokens are truncated, or with `split_long` (pre-training, no
    labels) cut into several examples so that no text is lost.
    """

    def __init__(self, rows: Sequence[dict], tokenizer, *, max_length: int = 512,
                 label_map: LabelMap | None = None, split_long: bool = False):
        texts = [r["text"] for r in rows]
        pairs = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None
        if pairs is not None:  # sentence pairs (e.g. NLI): <s> a </s></s> b </s>, the longer side truncated
            if split_long:
                raise ValueError("split_long is for single unlabelled texts, not sentence pairs")
            enc = tokenizer(texts, pairs, truncation="longest_first", max_length=max_length)["input_ids"]
        elif split_long:
            if label_map is not None:
                raise ValueError("split_long is for unlabelled text: it would duplicate labels")
            bos, eos, step = tokenizer.cls_token_id, tokenizer.sep_token_id, max_length - 2
            plain = tokenizer(texts, add_special_tokens=False)["input_ids"]
            enc = [[bos, *ids[i:i + step], eos] for ids in plain
                   for i in range(0, max(len(ids), 1), step)]
        else:
            enc = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.ids = [np.array(e, np.int32) for e in enc]
        self.lengths = np.array([len(e) for e in self.ids], dtype=np.int64)
        self.pad_value = tokenizer.pad_token_id
        self.targets = label_map.encode(r.get("label") for r in rows) if label_map is not None else None
        self.label_lengths = None

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int, rng: np.random.Generator | None = None) -> dict:
        out = {"input_ids": self.ids[i]}
        if self.targets is not None:
            out["labels"] = self.targets[i]
        return out


class PackedTextDataset:
    """Pre-training blocks as fairseq's TokenBlockDataset(break_mode="complete_doc") + a leading <s>.

    `lines` is plain text, one sentence (or paragraph) a line, a blank line between documents (fairseq's
    raw-text layout; text without blank lines is one document). Each line ends in </s>; a block is <s>
    followed by as many whole consecutive lines of one document as fit in `tokens_per_sample`, so no
    block crosses a document. A line longer than a block is cut into block-sized pieces, each ending in
    </s> (fairseq would keep it whole, longer than the model's positions).
    """

    def __init__(self, lines: Iterable[str], tokenizer, *, tokens_per_sample: int = 512):
        bos, eos = tokenizer.cls_token_id, tokenizer.sep_token_id
        if tokens_per_sample < 3:
            raise ValueError(f"tokens_per_sample must hold <s>, a token and </s>, got {tokens_per_sample}")
        lines = [ln.strip() for ln in lines]
        sentences = tokenizer([ln for ln in lines if ln], add_special_tokens=False)["input_ids"] if any(lines) else []
        capacity, piece = tokens_per_sample - 1, tokens_per_sample - 2  # room for <s>; for </s>
        blocks: list[list[int]] = []
        current: list[int] = []
        sentence = iter(sentences)
        for line in lines + [""]:  # a final blank line closes the last document
            if not line:
                if current:
                    blocks.append(current)
                current = []
                continue
            ids = next(sentence)
            for part in ([ids[i:i + piece] + [eos] for i in range(0, len(ids), piece)] if ids else [[eos]]):
                if current and len(current) + len(part) > capacity:
                    blocks.append(current)
                    current = []
                current.extend(part)
        if not blocks:
            raise ValueError("no text to pack into blocks")
        self.ids = [np.array([bos] + b, np.int32) for b in blocks]
        self.lengths = np.array([len(b) for b in self.ids], dtype=np.int64)
        self.pad_value = tokenizer.pad_token_id
        self.label_lengths = None

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int, rng: np.random.Generator | None = None) -> dict:
        return {"input_ids": self.ids[i]}


def truecase_tags(words: Sequence[str]) -> list[str]:
    """Capitalisation class of each word: UPPER (all caps, 2+ letters), Cap (first letter upper) or O."""
    tags = []
    for w in words:
        letters = [c for c in w if c.isalpha()]
        if len(letters) > 1 and all(c.isupper() for c in letters):
            tags.append("UPPER")
        elif letters and letters[0].isupper():
            tags.append("Cap")
        else:
            tags.append("O")
    return tags


def truecasing_rows(lines: Iterable[str]) -> list[dict]:
    """Token-classification examples from plain text: lower-cased words tagged with their original case
    (`truecase_tags`); the shipped default for `--task token-classification`."""
    rows = []
    for line in lines:
        words = line.split()
        if words:
            rows.append({"tokens": [w.lower() for w in words], "tags": truecase_tags(words)})
    return rows


class TaggedTextDataset:
    """Pre-split words with one tag each (NER, POS, truecasing), as Data2VecTextForTokenClassification wants.

    Words are tokenized one by one with a leading space (RoBERTa's `add_prefix_space` convention, valid for
    any tokenizer); the first sub-token of a word carries its tag id and the others -100, as do <s> and </s>.
    Examples longer than max_length tokens are truncated (words past the end lose their tags).
    """

    def __init__(self, rows: Sequence[dict], tokenizer, label_map: LabelMap, *, max_length: int = 512):
        words = [w for r in rows for w in r["tokens"]]
        pieces = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"] if words else []
        tag_ids = label_map.encode(t for r in rows for t in r["tags"])
        bos, eos = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.ids, self.tags, k = [], [], 0
        for r in rows:
            if len(r["tokens"]) != len(r["tags"]):
                raise ValueError(f"{len(r['tokens'])} words but {len(r['tags'])} tags in {r['tokens'][:8]}...")
            ids, tags = [bos], [IGNORE_INDEX]
            for _ in r["tokens"]:
                ids += pieces[k] or [tokenizer.unk_token_id]
                tags += [tag_ids[k]] + [IGNORE_INDEX] * (max(len(pieces[k]), 1) - 1)
                k += 1
            ids, tags = ids[:max_length - 1] + [eos], tags[:max_length - 1] + [IGNORE_INDEX]
            self.ids.append(np.array(ids, np.int32))
            self.tags.append(np.array(tags, np.int32))
        self.lengths = np.array([len(i) for i in self.ids], dtype=np.int64)
        self.label_lengths = self.lengths  # labels run along the tokens: one width per bucket
        self.pad_value = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int, rng: np.random.Generator | None = None) -> dict:
        return {"input_ids": self.ids[i], "labels": self.tags[i]}
