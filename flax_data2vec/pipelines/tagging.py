"""Token-classification outputs from per-token probabilities: transformers' word and entity aggregation
(none / simple / first / average / max), with character offsets into the input text."""

from __future__ import annotations

import warnings

import numpy as np

WORD_STRATEGIES = ("first", "average", "max")


def _is_subword(tokenizer, text: str, token: str, start: int, end: int, strategy: str) -> bool:
    model = getattr(getattr(tokenizer, "_tokenizer", None), "model", None)
    if getattr(model, "continuing_subword_prefix", None):  # a word-aware BPE: the prefix marks subwords
        return len(token) != len(text[start:end])
    if strategy in WORD_STRATEGIES:
        warnings.warn("Tokenizer does not support real words, using fallback heuristic", UserWarning, stacklevel=2)
    return start > 0 and " " not in text[start - 1:start + 1]


def token_entries(tokenizer, text: str, enc: dict, scores: np.ndarray, strategy: str) -> list[dict]:
    """One entry per non-special token: its string, scores, character span and whether it continues a word."""
    out = []
    for idx, (token_id, special) in enumerate(zip(enc["input_ids"], enc["special_tokens_mask"])):
        if special:
            continue
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        start, end = (int(v) for v in enc["offset_mapping"][idx])
        subword = _is_subword(tokenizer, text, token, start, end, strategy)
        if int(token_id) == tokenizer.unk_token_id:
            token, subword = text[start:end], False
        out.append({"word": token, "scores": scores[idx], "start": start, "end": end, "index": idx,
                    "is_subword": subword})
    return out


def _word(tokenizer, id2label: dict, group: list[dict], strategy: str) -> dict:
    """One word's label from its tokens: the first token's, the most confident token's, or the mean scores'."""
    if strategy == "first":
        scores = group[0]["scores"]
    elif strategy == "max":
        scores = max(group, key=lambda e: e["scores"].max())["scores"]
    else:
        scores = np.nanmean(np.stack([e["scores"] for e in group]), axis=0)
    best = int(scores.argmax())
    return {"entity": id2label[best], "score": scores[best],
            "word": tokenizer.convert_tokens_to_string([e["word"] for e in group]),
            "start": group[0]["start"], "end": group[-1]["end"]}


def _tag(label: str) -> tuple[str, str]:
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _group(tokenizer, group: list[dict]) -> dict:
    return {"entity_group": group[0]["entity"].split("-", 1)[-1],
            "score": np.mean(np.nanmean([e["score"] for e in group])),
            "word": tokenizer.convert_tokens_to_string([e["word"] for e in group]),
            "start": group[0]["start"], "end": group[-1]["end"]}


def group_entities(tokenizer, entities: list[dict]) -> list[dict]:
    """Adjacent entities with the same tag merge, unless the later one begins a new entity (B-)."""
    groups, current = [], []
    for e in entities:
        bi, tag = _tag(e["entity"])
        if current and tag == _tag(current[-1]["entity"])[1] and bi != "B":
            current.append(e)
            continue
        if current:
            groups.append(_group(tokenizer, current))
        current = [e]
    if current:
        groups.append(_group(tokenizer, current))
    return groups


def entities(tokenizer, id2label: dict, text: str, enc: dict, scores: np.ndarray, strategy: str,
             ignore_labels: list[str]) -> list[dict]:
    """The pipeline output for one text, labels in `ignore_labels` left out."""
    entries = token_entries(tokenizer, text, enc, scores, strategy)
    if strategy in ("none", "simple"):
        found = []
        for e in entries:
            best = int(e["scores"].argmax())
            found.append({"entity": id2label[best], "score": e["scores"][best], "index": e["index"],
                          "word": e["word"], "start": e["start"], "end": e["end"]})
    else:
        words, group = [], []
        for e in entries:
            if group and not e["is_subword"]:
                words.append(_word(tokenizer, id2label, group, strategy))
                group = []
            group.append(e)
        if group:
            words.append(_word(tokenizer, id2label, group, strategy))
        found = words
    if strategy != "none":
        found = group_entities(tokenizer, found)
    return [e for e in found if e.get("entity") not in ignore_labels and e.get("entity_group") not in ignore_labels]
