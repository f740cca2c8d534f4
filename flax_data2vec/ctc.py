"""CTC loss with transformers' semantics on top of `optax.ctc_loss`.

transformers drops labels equal to -100 or to the blank id and packs the rest to the left, gives
impossible alignments an infinite loss (or zero with `zero_infinity`), and reduces by 'sum' or by
'mean' (each loss divided by its target length, then averaged). optax computes the per-sequence
negative log-likelihood; this module does the bookkeeping around it.

`ctc_nll_unrolled` is an alternative core for accelerators: the forward recursion over the 2L+1
blank-interleaved states, normalised every frame, in a `lax.scan` unrolled `unroll` frames per loop
iteration. optax's scan runs one small loop iteration per frame, forward and backward, which on GPU costs
~20 ms of a 45 ms audio-base step (REFERENCE.md §7); whether unrolling wins there is unmeasured
(`python -m benchmarks.ctc --device gpu`), and on CPU it is slower than optax, so optax stays the default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def pack_labels(labels: Array, blank_id: int, ignore_index: int = -100) -> tuple[Array, Array]:
    """Move the valid labels of each row to the front; return (labels, valid mask), both (batch, L)."""
    valid = (labels != ignore_index) & (labels != blank_id)
    order = jnp.argsort(~valid, axis=-1, stable=True)
    packed = jnp.take_along_axis(labels, order, axis=-1)
    packed_valid = jnp.take_along_axis(valid, order, axis=-1)
    return jnp.where(packed_valid, packed, 0), packed_valid


def min_frames_needed(labels: Array, valid: Array) -> Array:
    """Fewest frames any alignment needs: one per label plus a blank between equal neighbours."""
    repeats = (labels[:, 1:] == labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    return valid.sum(-1) + repeats.sum(-1)


_LOG_ZERO = -1e30  # finite "log 0": keeps gradients of unreachable states at 0 instead of NaN


def ctc_nll_unrolled(logits: Array, logit_paddings: Array, labels: Array, label_paddings: Array,
                     blank_id: int = 0, unroll: int = 8) -> Array:
    """Per-sequence CTC negative log-likelihood with `optax.ctc_loss`'s arguments and value.

    alpha runs over the extended label sequence (blank, l1, blank, l2, ..., blank). Each frame it is
    shifted by one and two states (the second only into a label differing from the one two back),
    combined by a 3-way log-sum-exp, and renormalised by its maximum; the maxima (constants for the
    gradient, which is exact either way) are summed back at the end.
    """
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    batch, frames, _ = logits.shape
    states = 2 * labels.shape[1] + 1
    ext = jnp.full((batch, states), blank_id, labels.dtype).at[:, 1::2].set(labels)
    two_back = jnp.pad(ext, ((0, 0), (2, 0)), constant_values=blank_id)[:, :states]
    is_label = (jnp.arange(states) % 2 == 1) & (jnp.arange(states) >= 2)
    can_skip = is_label[None] & (ext != two_back)
    emit = jnp.take_along_axis(logprobs, jnp.broadcast_to(ext[:, None, :], (batch, frames, states)), axis=2)
    live = logit_paddings < 0.5

    def shift(alpha, k):
        return jnp.pad(alpha, ((0, 0), (k, 0)), constant_values=_LOG_ZERO)[:, :states]

    def frame(alpha, inputs):
        emit_t, live_t = inputs
        stay, step, skip = alpha, shift(alpha, 1), jnp.where(can_skip, shift(alpha, 2), _LOG_ZERO)
        top = jnp.maximum(jnp.maximum(stay, step), skip)
        new = top + jnp.log(jnp.exp(stay - top) + jnp.exp(step - top) + jnp.exp(skip - top)) + emit_t
        norm = jax.lax.stop_gradient(jnp.where(live_t, new.max(-1), 0.0))
        return jnp.where(live_t[:, None], new - norm[:, None], alpha), norm

    start = jnp.full((batch, states), _LOG_ZERO).at[:, 0].set(0.0)
    alpha, norms = jax.lax.scan(frame, start, (emit.transpose(1, 0, 2), live.T), unroll=unroll)
    n = (label_paddings < 0.5).sum(-1)
    last_blank = jnp.take_along_axis(alpha, (2 * n)[:, None], axis=1)[:, 0]
    last_label = jnp.where(n > 0, jnp.take_along_axis(alpha, jnp.maximum(2 * n - 1, 0)[:, None], axis=1)[:, 0],
                           _LOG_ZERO)
    return -(jnp.logaddexp(last_blank, last_label) + norms.sum(0))


def ctc_loss(logits: Array, logit_lengths: Array, labels: Array, blank_id: int = 0, reduction: str = "sum",
             zero_infinity: bool = False, ignore_index: int = -100, implementation: str = "optax",
             unroll: int = 8) -> Array:
    """CTC loss of (batch, frames, vocab) logits against (batch, L) labels, as transformers' `ForCTCLoss`.

    Computed in float32 whatever the logits' dtype. reduction: 'sum', 'mean' or 'none'. implementation:
    'optax' (`optax.ctc_loss`) or 'unrolled' (`ctc_nll_unrolled`, `unroll` frames per loop iteration).
    """
    if implementation not in ("optax", "unrolled"):
        raise ValueError(f"implementation must be 'optax' or 'unrolled', got {implementation!r}")
    logits = logits.astype(jnp.float32)
    frames = logits.shape[1]
    logit_paddings = (jnp.arange(frames)[None, :] >= logit_lengths[:, None]).astype(jnp.float32)
    packed, valid = pack_labels(labels, blank_id, ignore_index)
    label_paddings = (~valid).astype(jnp.float32)
    if implementation == "optax":
        per_seq = optax.ctc_loss(logits, logit_paddings, packed, label_paddings, blank_id=blank_id)
    else:
        per_seq = ctc_nll_unrolled(logits, logit_paddings, packed, label_paddings, blank_id, unroll)
    feasible = logit_lengths >= min_frames_needed(packed, valid)
    per_seq = jnp.where(feasible, per_seq, 0.0 if zero_infinity else jnp.inf)
    if reduction == "none":
        return per_seq
    if reduction == "sum":
        return per_seq.sum()
    if reduction == "mean":
        target_lengths = jnp.maximum(valid.sum(-1), 1)
        return (per_seq / target_lengths).mean()
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
