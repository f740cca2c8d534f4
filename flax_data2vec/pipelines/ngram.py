"""A word bigram LM in ARPA format built from transcripts, for beam search with `lm=` (kenlm reads ARPA):
a domain LM in one call when kenlm's `lmplz` binary is not at hand (pip's kenlm has only the reader)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable


def write_arpa(path: str, sentences: Iterable[str], discount: float = 0.5) -> str:
    """Write a word bigram LM of `sentences` to `path` (ARPA) and return the path.

    Bigrams seen in training keep their count less `discount` (absolute discounting); the mass taken off backs
    off to add-one unigram probabilities, so every word of the vocabulary (and `<unk>`) has a probability.
    """
    if not 0 < discount < 1:
        raise ValueError(f"discount must be in (0, 1), got {discount}")
    unigrams, bigrams = Counter(), Counter()
    for s in sentences:
        words = ["<s>", *s.split(), "</s>"]
        unigrams.update(words[1:])
        bigrams.update(zip(words, words[1:]))
    if not bigrams:
        raise ValueError("write_arpa needs at least one sentence")
    vocab = sorted(unigrams) + ["<unk>"]
    total = sum(unigrams.values()) + len(vocab)
    p_unigram = {w: (unigrams[w] + 1) / total for w in vocab}
    history, followers = Counter(), {}
    for (a, b), c in bigrams.items():
        history[a] += c
        followers.setdefault(a, []).append(b)
    backoff = {a: (discount * len(followers[a]) / history[a]) / (1 - sum(p_unigram[b] for b in followers[a]))
               for a in history}
    lines = ["\\data\\", f"ngram 1={len(vocab) + 1}", f"ngram 2={len(bigrams)}", "", "\\1-grams:",
             f"-99\t<s>\t{math.log10(backoff['<s>']):.6f}"]
    for w in vocab:
        weight = f"\t{math.log10(backoff[w]):.6f}" if w in backoff else ""
        lines.append(f"{math.log10(p_unigram[w]):.6f}\t{w}{weight}")
    lines += ["", "\\2-grams:"]
    lines += [f"{math.log10((c - discount) / history[a]):.6f}\t{a} {b}" for (a, b), c in sorted(bigrams.items())]
    with open(path, "w") as f:
        f.write("\n".join(lines + ["", "\\end\\", ""]))
    return path
