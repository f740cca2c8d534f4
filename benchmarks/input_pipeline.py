"""Input pipeline throughput, old loader beside new, by worker count, in one run.

Old: the threaded `BatchIterator` (+ the loop's `prefetch` thread) of the commit before input_pipeline.py
existed, or the Grain one of `--old REF`, exported with `git archive` into a temp dir. New: the Grain
`BatchIterator` of this tree. Each (loader, data, workers) cell runs in a fresh subprocess with only that
tree's `flax_data2vec` on the path; cells are interleaved old/new and repeated, and the median is reported.
Threaded workers are decoding threads, Grain's are processes; 0 = one background thread (threaded: the
loop's prefetch thread; Grain: its own).

Data: the shipped speech clips (data/speech_digits, 0.85 s on average), 12-s clips made by concatenating
them (FLAC, 16 kHz, in a temp dir), and the shipped text corpus as 512-token pre-training rows with the
data2vec text mask drawn per batch (TextDataset(split_long), which both trees have).

    python benchmarks/input_pipeline.py [--workers 0 1 2 4] [--repeats 3] [--seconds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECH = os.path.join(ROOT, "data", "speech_digits")
CORPUS = os.path.join(ROOT, "data", "text", "corpus.txt")
BATCH = 8


# ----------------------------------------------------------------------------- one cell (in a subprocess)

def mask_tokens(batch: dict, rng: np.random.Generator, mask_token_id: int, special_ids: list[int],
                vocab_size: int) -> dict:
    """The data2vec text pre-training transform (released defaults), as the trainer runs it per batch."""
    from flax_data2vec.masking import compute_text_mask
    masked, mask = compute_text_mask(batch["input_ids"], rng, mask_token_id=mask_token_id, special_ids=special_ids,
                                     attention_mask=batch["attention_mask"], vocab_size=vocab_size)
    return {**batch, "input_ids": masked, "target_ids": batch["input_ids"], "mask": mask}


def _dataset(cell: dict):
    """(dataset, transform or None) for one cell, built with the tree on the path."""
    import functools

    from flax_data2vec.train import data as D
    if cell["data"] != "text":
        return D.AudioDataset(D.read_manifest(cell["manifest"])), None
    tok = D.build_small_bpe_tokenizer(CORPUS, vocab_size=2000)
    lines = [r["text"] for r in D.load_text_lines(CORPUS)]
    ds = D.TextDataset([{"text": t} for t in lines], tok, max_length=512, split_long=True)  # in both trees
    return ds, functools.partial(mask_tokens, mask_token_id=tok.mask_token_id, special_ids=tok.all_special_ids,
                                 vocab_size=len(tok))


def _iterator(cell: dict, ds, transform):
    import flax_data2vec.train.data as D
    workers = cell["workers"]
    if importlib.util.find_spec("flax_data2vec.train.input_pipeline"):  # a Grain tree
        from flax_data2vec.train.input_pipeline import BatchIterator
        return BatchIterator(ds, BATCH, multiple=320 if cell["data"] != "text" else 8, n_buckets=3, seed=0,
                               num_workers=workers, prefetch=4, transform=transform)
    it = D.BatchIterator(ds, BATCH, multiple=320 if cell["data"] != "text" else 8, n_buckets=3, seed=0,
                         num_workers=workers)

    def produce():  # the old loop: prepare ran in the prefetch thread, rng from the position after the batch
        for batch in it:
            pos = it.state()
            yield batch if transform is None else transform(batch, np.random.default_rng([0, pos["epoch"],
                                                                                          pos["index"]]))
    return D.prefetch(produce(), 4)


def run_cell(cell: dict) -> dict:
    """Times one loader: the first batch (start-up) apart, then batches for `seconds`."""
    import flax_data2vec
    ds, transform = _dataset(cell)
    t0 = time.perf_counter()
    it = _iterator(cell, ds, transform)
    batch = next(it)
    first = time.perf_counter() - t0
    key = "input_values" if "input_values" in batch else "input_ids"
    for _ in range(3):  # every worker has started and delivered
        next(it)
    n, units, t0 = 0, 0.0, time.perf_counter()
    while time.perf_counter() - t0 < cell["seconds"] or n < 20:
        batch = next(it)
        units += float(batch["attention_mask"].sum())
        n += 1
    elapsed = time.perf_counter() - t0
    it.close()
    per_s = units / elapsed / (16000.0 if key == "input_values" else 1.0)
    return {"package": os.path.dirname(flax_data2vec.__file__), "first_batch_s": first, "batches": n,
            "per_s": per_s, "batches_per_s": n / elapsed}


# ----------------------------------------------------------------------------- the run

def _old_tree(out: str, ref: str = "") -> tuple[str, str]:
    """(folder holding the old flax_data2vec, its commit): `ref`, or the parent of the commit that added
    input_pipeline.py (the threaded loader)."""
    if not ref:
        added = subprocess.run(["git", "log", "-n1", "--diff-filter=A", "--format=%H", "--",
                                "flax_data2vec/train/input_pipeline.py"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
        if not added:
            raise SystemExit("input_pipeline.py is not committed: nothing to compare against")
        ref = f"{added}^"
    ref = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", ref, "flax_data2vec"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", out], input=archive.stdout, check=True)
    return out, ref


def _long_clips(out: str, seconds: float = 12.0, count: int = 48) -> str:
    """A manifest of `count` clips of `seconds` s, each the shipped clips back to back (FLAC, 16 kHz)."""
    import soundfile as sf
    rows = [json.loads(line) for line in open(os.path.join(SPEECH, "train.jsonl"))]
    waves = iter(sf.read(os.path.join(SPEECH, r["path"]), dtype="float32")[0] for r in rows * 40)
    with open(os.path.join(out, "long.jsonl"), "w") as f:
        for k in range(count):
            parts, n = [], 0
            while n < seconds * 16000:
                parts.append(next(waves))
                n += len(parts[-1])
            path = os.path.join(out, f"long-{k:03d}.flac")
            sf.write(path, np.concatenate(parts)[:int(seconds * 16000)], 16000)
            f.write(json.dumps({"path": path}) + "\n")
    return os.path.join(out, "long.jsonl")


def _spawn(cell: dict, tree: str) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--cell", json.dumps(cell)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"cell {cell} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["package"].startswith(tree):
        raise RuntimeError(f"cell {cell} imported {result['package']}, not the tree {tree}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--data", nargs="+", default=["short", "12s", "text"], choices=["short", "12s", "text"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per cell")
    p.add_argument("--old", default="", metavar="REF", help="commit of the old loader (default: the threaded one "
                   "before Grain; a Grain commit compares two Grain loaders)")
    p.add_argument("--json", default=None)
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell, print JSON
    args = p.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return
    sys.path.insert(0, ROOT)
    from benchmarks.common import load_average

    with tempfile.TemporaryDirectory() as tmp:
        os.mkdir(os.path.join(tmp, "old"))
        old_tree, old_ref = _old_tree(os.path.join(tmp, "old"), args.old)
        manifests = {"short": os.path.join(SPEECH, "train.jsonl"), "12s": _long_clips(tmp), "text": ""}
        trees = {"old": old_tree, "new": ROOT}
        cells = [{"data": d, "workers": w, "loader": loader, "manifest": manifests[d], "seconds": args.seconds}
                 for d in args.data for w in args.workers for loader in ("old", "new")]
        info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cores_visible": len(os.sched_getaffinity(0)),
                "old_commit": old_ref, "batch_size": BATCH, "load_average_at_start": load_average()}
        print(f"# {info['date']}; {info['cores_visible']} cores; old loader = {old_ref[:10]}; batch {BATCH}; "
              f"load average {info['load_average_at_start']}", flush=True)
        results: dict[tuple, list[dict]] = {}
        for r in range(args.repeats):
            order = cells if r % 2 == 0 else [c for pair in zip(cells[1::2], cells[::2]) for c in pair]
            for cell in order:  # old and new of one (data, workers) side by side, alternating who goes first
                key = (cell["data"], cell["workers"], cell["loader"])
                results.setdefault(key, []).append(_spawn(cell, trees[cell["loader"]]))
        info["load_average_at_end"] = load_average()
    rows = []
    for d in args.data:
        unit = "tokens/s" if d == "text" else "audio-s/s"
        one = {loader: statistics.median(x["per_s"] for x in results[(d, 1, loader)])
               for loader in ("old", "new")} if 1 in args.workers else None
        for w in args.workers:
            row = {"data": d, "workers": w, "unit": unit}
            for loader in ("old", "new"):
                runs = results[(d, w, loader)]
                row[loader] = statistics.median(x["per_s"] for x in runs)
                row[f"{loader}_runs"] = [round(x["per_s"], 1) for x in runs]
                row[f"{loader}_first_batch_s"] = statistics.median(x["first_batch_s"] for x in runs)
                if one:
                    row[f"{loader}_vs_1_worker"] = row[loader] / one[loader]
            row["new_vs_old"] = row["new"] / row["old"]
            rows.append(row)
    print(f"{'data':6} {'workers':>7} {'unit':>9} {'old':>9} {'new':>9} {'new/old':>7} {'old/1w':>6} "
          f"{'new/1w':>6} {'start old':>9} {'start new':>9}")
    for r in rows:
        print(f"{r['data']:6} {r['workers']:>7} {r['unit']:>9} {r['old']:>9.0f} {r['new']:>9.0f} "
              f"{r['new_vs_old']:>7.2f} {r.get('old_vs_1_worker', float('nan')):>6.2f} "
              f"{r.get('new_vs_1_worker', float('nan')):>6.2f} {r['old_first_batch_s']:>8.2f}s "
              f"{r['new_first_batch_s']:>8.2f}s")
    print(f"# load average at end {info['load_average_at_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
