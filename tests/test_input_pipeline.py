"""Tests for the training input pipeline (flax_data2vec.train.input_pipeline): plan, Grain workers, resume."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import test_data

from flax_data2vec.train import data as D
from flax_data2vec.train import input_pipeline as P

# test_data's fixtures, shared (tests/conftest.py should own them once it exists)
train_rows, vocab, ctc_data, tokenizer, text_data = (test_data.train_rows, test_data.vocab, test_data.ctc_data,
                                                     test_data.tokenizer, test_data.text_data)


def _same(a: list[dict], b: list[dict], skip=()) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k not in skip:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_buckets():
    assert P.bucket_lengths(1000, 4, 64) == [256, 512, 768, 1024]
    assert P.bucket_lengths(10, 8, 8) == [8, 16]
    assert P.crop_bucket_lengths(8000, 48000, 3, 320) == [8000, 27840, 48000]
    assert P.crop_bucket_lengths(700, 700, 4, 320) == [640]
    with pytest.raises(ValueError, match="needs positive arguments"):
        P.bucket_lengths(0, 4)
    with pytest.raises(ValueError, match="multiple 320 <= min_len 100"):
        P.crop_bucket_lengths(100, 5000, 2, 320)


def test_ctc_batches_bounded_shapes(ctc_data, vocab, train_rows):
    it = P.BatchIterator(ctc_data, 8, n_buckets=3, multiple=1600, num_epochs=2, seed=3)
    shapes, seen = set(), 0
    for batch in it:
        b, s = batch["input_values"].shape
        assert batch["input_values"].dtype == np.float32 and batch["attention_mask"].dtype == np.int32
        assert batch["labels"].dtype == np.int32 and b == 8 and s in it.buckets
        shapes.add((s, batch["labels"].shape[1]))
        lens = batch["attention_mask"].sum(1)
        for row in range(b):
            assert np.all(batch["input_values"][row, lens[row]:] == 0)
            assert vocab.decode(batch["labels"][row], collapse=False) in {r["text"] for r in train_rows[:96]}
        seen += b
    assert seen == 2 * 96 and len(shapes) <= 3 and it.state() == {"epoch": 1, "index": 12}
    with pytest.raises(ValueError, match="exceeds the largest bucket 8000"):
        P.BatchIterator(ctc_data, 8, buckets=[8000])


def test_eval_iteration_sees_every_example_once(text_data):
    it = P.BatchIterator(text_data, 32, shuffle=False, num_epochs=1, drop_remainder=False, n_buckets=2)
    seen = []
    for batch in it:
        assert batch["input_ids"].shape[0] == 32 and batch["labels"].shape == (32,)
        assert np.all(batch["input_ids"][batch["attention_mask"] == 0] == text_data.pad_value)
        for row in np.flatnonzero(batch["example_mask"]):
            seen.append(tuple(batch["input_ids"][row, :batch["attention_mask"][row].sum()]))
    assert sorted(seen) == sorted(tuple(x) for x in text_data.ids)  # 300 = 9 full batches + 12



def test_resume_from_state_mid_epoch_and_across_epochs(text_data):
    def make(**kw):
        return P.BatchIterator(text_data, 16, seed=7, n_buckets=3, **kw)
    it = make()
    assert it.batches_per_epoch() == 18
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.state()))  # saved in the checkpoint's JSON metadata
    assert state == {"epoch": 0, "index": 7}
    first = [next(it) for _ in range(15)]  # crosses the epoch boundary
    assert it.state() == {"epoch": 1, "index": 4}
    fresh = make()
    fresh.set_state(state)
    _same(first, [next(fresh) for _ in range(15)])
    it.set_state({"epoch": 0, "index": 18})  # after the last batch of epoch 0 = before the first of epoch 1
    _same(first[11:], [next(it) for _ in range(4)])
    synchronous = make(prefetch=0)
    synchronous.set_state(state)
    _same(first[:3], [next(synchronous) for _ in range(3)])
    other_epoch = make()
    other_epoch.set_state({"epoch": 1, "index": 0})
    assert not np.array_equal(next(other_epoch)["labels"], next(make())["labels"])
    for i in (it, fresh, synchronous, other_epoch):
        i.close()


def test_host_sharding(ctc_data):
    full = list(P.BatchIterator(ctc_data, 8, num_epochs=1, seed=1, multiple=320))
    parts = [list(P.BatchIterator(ctc_data, 8, num_epochs=1, seed=1, multiple=320, shard_index=i, num_shards=2))
             for i in range(2)]
    for g, a, b in zip(full, *parts):
        for k in g:
            np.testing.assert_array_equal(g[k], np.concatenate([a[k], b[k]]))
    with pytest.raises(ValueError, match="not divisible by num_shards"):
        P.BatchIterator(ctc_data, 8, num_shards=3)


def noise_and_worker(batch: dict, rng: np.random.Generator) -> dict:
    """A per-batch host transform (module level, so workers can unpickle it); reports JAX's state there."""
    from jax._src import xla_bridge
    return {**batch, "noise": rng.integers(1 << 30, size=4), "pid": np.array(os.getpid()),
            "jax_initialised": np.array(xla_bridge.backends_are_initialized())}


def test_a_prefix_attention_mask_travels_as_lengths():
    """Workers send a prefix mask as row lengths; the consumer rebuilds the same array (values and dtype); any
    other mask travels as it is."""
    mask = np.zeros((3, 7), np.int32)
    mask[0, :7], mask[1, :2] = 1, 1
    batch = {"input_values": np.ones((3, 7), np.float32), "attention_mask": mask, "example_mask": np.ones(3)}
    packed = P._pack(batch)
    assert "attention_mask" not in packed
    rebuilt = P._unpack(packed)
    assert rebuilt.keys() == batch.keys() and rebuilt["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(rebuilt["attention_mask"], mask)
    holes = mask.copy()
    holes[0, 3] = 0
    assert P._pack({**batch, "attention_mask": holes})["attention_mask"] is holes


def test_workers_in_a_fresh_interpreter():
    """The worker test below, run in its own interpreter: inside the whole suite, earlier tests leave this
    process in a state (seen, not yet explained) in which spawned workers report JAX as initialised."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_workers_give_identical_batches_and_resume"], cwd=root,
                          env={**os.environ, "FLAX_DATA2VEC_FRESH_WORKER_TEST": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.skipif(not os.environ.get("FLAX_DATA2VEC_FRESH_WORKER_TEST"),
                    reason="run by test_workers_in_a_fresh_interpreter in its own interpreter")
def test_workers_give_identical_batches_and_resume(ctc_data):
    """0 and 2 worker processes give the same batches and transform draws; a 2-worker position resumes
    under 1 worker (positions do not depend on the worker count). Worker start-up dominates the time."""
    def make(workers, **kw):
        return P.BatchIterator(ctc_data, 8, seed=5, multiple=320, n_buckets=2, num_workers=workers, **kw)
    runs, states = {}, {}
    for workers in (0, 2):
        it = make(workers, transform=noise_and_worker)
        runs[workers], states[workers] = [], []
        for _ in range(9):
            runs[workers].append(next(it))
            states[workers].append(it.state())
        it.close()
    _same(runs[0], runs[2], skip=("pid",))
    assert states[2] == states[0] and states[0][-1] == {"epoch": 0, "index": 9}
    assert len({int(b["pid"]) for b in runs[2]}) == 2 and os.getpid() not in {int(b["pid"]) for b in runs[2]}
    assert not any(b["jax_initialised"] for b in runs[2])  # JAX never starts in a worker
    reference = make(0, transform=noise_and_worker)
    reference.set_state(states[0][-1])
    for _ in range(5):  # 12 batches an epoch: into epoch 1
        runs[0].append(next(reference))
        states[0].append(reference.state())
    for batch, state in zip(runs[0], states[0]):  # the rng: (seed, epoch, index) of the state after the batch
        expected = np.random.default_rng([5, state["epoch"], state["index"]]).integers(1 << 30, size=4)
        np.testing.assert_array_equal(batch["noise"], expected)
    resumed = make(1, transform=noise_and_worker)
    resumed.set_state(json.loads(json.dumps(states[2][8])))
    _same(runs[0][9:], [next(resumed) for _ in range(5)], skip=("pid",))
    assert resumed.state() == states[0][-1] == {"epoch": 1, "index": 2}
    resumed.close()
    # two live iterators with workers (a train and an eval pipeline) interleaved: each keeps its own batches
    first, second = make(1, transform=noise_and_worker), make(1, transform=noise_and_worker)
    pairs = [(next(first), next(second)) for _ in range(5)]
    first.close(), second.close()
    _same(runs[0][:5], [p[0] for p in pairs], skip=("pid",))
    _same(runs[0][:5], [p[1] for p in pairs], skip=("pid",))
    lock = threading.Lock()
    with pytest.raises(ValueError, match="cannot be sent to worker processes"):
        make(2, transform=lambda batch, rng: lock and batch)


def test_pretrain_audio_batches_are_cropped_never_padded(train_rows, vocab, text_data):
    """fairseq's pad=False collater: every row cropped to the batch's shortest, at random offsets."""
    ds = D.AudioDataset(train_rows[:64], max_samples=40000, crop=True, min_samples=12000)
    it = P.BatchIterator(ds, 8, n_buckets=4, multiple=320, seed=2, crop_to_shortest=True, num_epochs=1,
                         drop_remainder=False)
    assert it.buckets[0] <= ds.lengths.min() and it.buckets[-1] <= ds.lengths.max()
    plan, offsets = it.plan, set()
    for position, batch in enumerate(it):
        planned = plan[position]
        shortest = ds.lengths[planned.rows[planned.rows >= 0]].min()
        length = batch["input_values"].shape[1]
        assert np.all(batch["attention_mask"] == 1)  # no padded frame
        assert length == max(b for b in it.buckets if b <= shortest)
        for row, i in enumerate(planned.rows[planned.rows >= 0][:2]):
            whole, cropped = D.normalize_audio(D.load_audio(ds.rows[i]["path"])), batch["input_values"][row]
            starts = [s for s in np.flatnonzero(whole[:len(whole) - length + 1] == cropped[0])
                      if np.array_equal(whole[s:s + length], cropped)]  # normalized whole, then cropped
            assert len(starts) == 1
            offsets.add(int(starts[0]))
    assert len(offsets) > 4  # random offsets, not always the start
    with pytest.raises(ValueError, match="needs a bucket <= the shortest example"):
        P.BatchIterator(ds, 8, buckets=[ds.lengths.min() + 1], crop_to_shortest=True)
    with pytest.raises(ValueError, match="would cut label sequences"):
        P.BatchIterator(D.AudioDataset(train_rows[:16], vocab=vocab), 8, crop_to_shortest=True)
    with pytest.raises(ValueError, match="needs a dataset that crops on load"):
        P.BatchIterator(text_data, 8, crop_to_shortest=True)
