#!/usr/bin/env python3
"""Build the shipped text corpus from Jane Austen's six novels (public domain).

The novels are read from Debian's `r-cran-janeaustenr` package, which stores them as R
character vectors in an R lazy-load database (`data/Rdata.rdb` + `Rdata.rdx`). A minimal R
unserializer below reads them without needing R. Lines are joined into paragraphs, chapter
headings dropped, Gutenberg-style `_italics_` markers removed. Each novel is split by
paragraph position: the first part feeds `corpus.txt` (unlabelled, for MLM pre-training);
passages of 1-3 sentences from the later parts feed the labelled novel-classification files.

Usage:
  cd /tmp && apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb ja
  python3 data/text/make_text_corpus.py /tmp/ja/usr/lib/R/site-library/janeaustenr/data
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import struct
import zlib

import numpy as np

NOVELS = {"sensesensibility": "sense_and_sensibility", "prideprejudice": "pride_and_prejudice",
          "mansfieldpark": "mansfield_park", "emma": "emma", "northangerabbey": "northanger_abbey",
          "persuasion": "persuasion"}


class _RReader:
    """Reads the subset of R's XDR serialization format used by character-vector data."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.buf, self.pos = data, 2
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            n = self.int()  # native encoding name follows
            self.pos += n
        self.refs: list = []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return value

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE
            return None
        if kind == 255:  # REFSXP: index packed in the flags, or following when 0
            return self.refs[(flags >> 8) - 1 if flags >> 8 else self.int() - 1]
        if kind == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            text = self.buf[self.pos:self.pos + n].decode("utf-8")
            self.pos += n
            return text
        if kind == 2:  # LISTSXP (pairlist): attributes come as (tag, value) pairs
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head, tail = self.item(), self.item()
            del attrs
            return [(tag, head)] + (tail or [])
        if kind in (10, 13, 16, 19):  # LGLSXP, INTSXP, STRSXP, VECSXP
            n = self.int()
            if kind in (10, 13):
                value = list(struct.unpack_from(f">{n}i", self.buf, self.pos))
                self.pos += 4 * n
            else:
                value = [self.item() for _ in range(n)]
            attrs = dict(self.item()) if has_attr else {}
            if "names" in attrs:
                return dict(zip(attrs["names"], value))
            return value
        raise ValueError(f"unsupported R SEXP type {kind}")


def read_lazyload_db(data_dir: str) -> dict[str, list[str]]:
    """Returns {variable: character vector} from data_dir/Rdata.rdx + Rdata.rdb."""
    with open(os.path.join(data_dir, "Rdata.rdx"), "rb") as f:
        index = _RReader(gzip.decompress(f.read())).item()
    with open(os.path.join(data_dir, "Rdata.rdb"), "rb") as f:
        db = f.read()
    out = {}
    for name, (offset, length) in index["variables"].items():
        block = db[offset:offset + length]
        out[name] = _RReader(zlib.decompress(block[4:])).item()  # 4-byte length, then zlib
    return out


def paragraphs(lines: list[str]) -> list[str]:
    """Joins wrapped lines into paragraphs; drops headings, title-page lines and italics marks."""
    paras, current = [], []
    if "A NOTE ON THE TEXT" in lines:  # a modern editor's note closes Northanger Abbey: not Austen's
        lines = lines[:lines.index("A NOTE ON THE TEXT")]
    for line in lines + [""]:
        line = (line or "").strip()
        if line:
            current.append(line)
            continue
        if current:
            text = re.sub(r"\s+", " ", " ".join(current)).replace("_", "").replace("*", "")
            heading = text == text.upper() or re.match(r"^(chapter|volume)\b", text, re.IGNORECASE)
            if len(text) >= 40 and not heading:
                paras.append(text)
            current = []
    return paras


def sentences(paragraph: str) -> list[str]:
    """Splits a paragraph at ., ! or ? (maybe closing a quote) before a capital, not after Mr. etc."""
    end = r'(?:(?<=[.!?])|(?<=[.!?]["\']))'
    not_title = r"(?<!Mr\.)(?<!Mrs\.)(?<!Dr\.)(?<!St\.)(?<!Col\.)"
    return [p.strip() for p in re.split(end + not_title + r'\s+(?=["\']?[A-Z])', paragraph) if p.strip()]


def passages(paragraph: str, min_chars: int = 150, max_chars: int = 400) -> list[str]:
    """Cuts a paragraph into non-overlapping runs of whole sentences of min..max characters."""
    out, run = [], []
    for sent in sentences(paragraph):
        run.append(sent)
        text = " ".join(run)
        if len(text) >= min_chars:
            if len(text) <= max_chars:
                out.append(text)
            run = []
    return out


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rdata_dir", help="janeaustenr's data/ folder (holding Rdata.rdb)")
    p.add_argument("--out", default=here)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus_chars", type=int, default=45_000, help="corpus characters per novel")
    p.add_argument("--train_per_novel", type=int, default=200)
    p.add_argument("--eval_per_novel", type=int, default=50)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    books = read_lazyload_db(args.rdata_dir)
    corpus, train, evals = [], [], []
    for key, label in NOVELS.items():
        paras = paragraphs(books[key])
        n_chars, cut = 0, 0
        while n_chars < args.corpus_chars:
            n_chars += len(paras[cut])
            cut += 1
        corpus.extend(paras[:cut])
        rest = paras[cut:]
        half = len(rest) // 2  # train passages from the middle, eval from the end of the book
        for pool, n, dest in ((rest[:half], args.train_per_novel, train),
                              (rest[half:], args.eval_per_novel, evals)):
            cands = [s for para in pool for s in passages(para)]
            pick = sorted(rng.choice(len(cands), size=n, replace=False))
            dest.extend({"text": cands[i], "label": label} for i in pick)
    for rows in (train, evals):
        rng.shuffle(rows)
    with open(os.path.join(args.out, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(corpus) + "\n")
    for name, rows in (("classify_train.jsonl", train), ("classify_eval.jsonl", evals)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"corpus: {len(corpus)} paragraphs, {sum(map(len, corpus))} chars; "
          f"classify: {len(train)} train, {len(evals)} eval")


if __name__ == "__main__":
    main()
