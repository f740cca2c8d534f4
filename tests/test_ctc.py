"""The CTC loss against torch's `F.ctc_loss` (the function transformers calls): both cores, every reduction,
repeated labels, empty and -100-padded labels, padded frames, impossible alignments, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # a test dependency: the reference these tests compare against

from flax_data2vec.ctc import ctc_loss

B, T, V, N = 6, 60, 7, 14


def _batch():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((B, T, V)) * 2).astype(np.float32)
    lengths = np.array([T, 50, 41, 60, 33, 6])
    label_lengths = np.array([14, 9, 0, 1, 12, 5])  # row 5: 5 labels (with repeats) cannot fit 6 frames
    labels = rng.integers(1, 4, (B, N))  # 3 symbols: many repeated neighbours
    labels[5, :5] = [2, 2, 2, 1, 1]
    labels = np.where(np.arange(N)[None] < label_lengths[:, None], labels, -100)
    return logits, lengths, labels, label_lengths


def _torch_loss(logits, lengths, labels, label_lengths, reduction, zero_infinity):
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(x, -1).transpose(0, 1)
    targets = torch.tensor(np.where(labels < 0, 0, labels))
    loss = torch.nn.functional.ctc_loss(logp, targets, torch.tensor(lengths), torch.tensor(label_lengths),
                                        blank=0, reduction=reduction, zero_infinity=zero_infinity)
    if reduction != "none":
        loss.backward()
    return loss.detach().numpy(), (x.grad.numpy() if x.grad is not None else None)


@pytest.mark.parametrize("implementation,unroll", [("optax", 1), ("unrolled", 7)])
@pytest.mark.parametrize("reduction,zero_infinity", [("none", False), ("sum", True), ("mean", True)])
def test_ctc_matches_torch(implementation, unroll, reduction, zero_infinity):
    """unroll 7 does not divide the 60 frames: the remainder iterations are covered too."""
    logits, lengths, labels, label_lengths = _batch()

    def loss(x):
        return ctc_loss(x, jnp.asarray(lengths), jnp.asarray(labels), 0, reduction, zero_infinity,
                        implementation=implementation, unroll=unroll)

    ref, ref_grad = _torch_loss(logits, lengths, labels, label_lengths, reduction, zero_infinity)
    ours = np.asarray(loss(jnp.asarray(logits)))
    if reduction == "none":
        assert np.isinf(ours[5]) and np.isinf(ref[5])
        np.testing.assert_allclose(ours[:5], ref[:5], rtol=1e-5, atol=1e-4)
        return
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
    grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    np.testing.assert_allclose(grad, ref_grad, atol=1e-4)
    assert not np.any(grad[5])  # the impossible row is zeroed, gradient included


def test_unknown_implementation_is_refused():
    logits, lengths, labels, _ = _batch()
    with pytest.raises(ValueError, match="implementation must be 'optax' or 'unrolled'"):
        ctc_loss(jnp.asarray(logits), jnp.asarray(lengths), jnp.asarray(labels), implementation="pallas")


def test_ctc_task_takes_either_core():
    """`train_tpu.py --ctc-implementation unrolled` gives the task the same loss as the optax default."""
    import dataclasses

    from flax_data2vec.train.config import parse_args
    from flax_data2vec.train.tasks import make_task

    cfg = parse_args(["--ctc-implementation", "unrolled", "--batch-size", "4", "--n-buckets", "1"])
    task = make_task(cfg)
    params = task.init()
    batch = {k: jnp.asarray(v) for k, v in next(task.train_data()).items()}
    unrolled = jax.jit(lambda p, b: task.loss(p, None, b, None, False)[0])(params, batch)
    default_task = make_task(dataclasses.replace(cfg, ctc_implementation="optax"))
    default = jax.jit(lambda p, b: default_task.loss(p, None, b, None, False)[0])(params, batch)
    np.testing.assert_allclose(float(unrolled), float(default), rtol=1e-5)
    with pytest.raises(ValueError, match="--ctc-implementation cudnn: must be one of optax, unrolled"):
        parse_args(["--ctc-implementation", "cudnn"])
