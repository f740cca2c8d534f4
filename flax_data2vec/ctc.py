"""CTC loss with transformers' semantics on top of `optax.ctc_loss`.

transformers drops labels equal to -100 or to the blank id and packs the rest to the left, gives
impossible alignments an infinite loss (or zero with `zero_infinity`), and reduces by 'sum' or by
'mean' (each loss divided by its target length, then averaged). optax computes the per-sequence
negative log-likelihood; this module does the bookkeeping around it.
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


def ctc_loss(logits: Array, logit_lengths: Array, labels: Array, blank_id: int = 0, reduction: str = "sum",
             zero_infinity: bool = False, ignore_index: int = -100) -> Array:
    """CTC loss of (batch, frames, vocab) logits against (batch, L) labels, as transformers' `ForCTCLoss`.

    Computed in float32 whatever the logits' dtype. reduction: 'sum', 'mean' or 'none'.
    """
    logits = logits.astype(jnp.float32)
    frames = logits.shape[1]
    logit_paddings = (jnp.arange(frames)[None, :] >= logit_lengths[:, None]).astype(jnp.float32)
    packed, valid = pack_labels(labels, blank_id, ignore_index)
    per_seq = optax.ctc_loss(logits, logit_paddings, packed, (~valid).astype(jnp.float32), blank_id=blank_id)
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
