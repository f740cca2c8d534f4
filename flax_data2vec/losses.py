"""Loss functions with the reductions and conventions of the PyTorch reference (float32 throughout).

Cross-entropy ignores label -100 and averages over the remaining targets, like `torch.nn.CrossEntropyLoss`
(so a batch with every target ignored gives NaN, as in torch). `problem_type` inference follows
transformers' sequence-classification heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

IGNORE_INDEX = -100
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def cross_entropy_sum(logits: Array, labels: Array, ignore_index: int = IGNORE_INDEX,
                      where: Array | None = None) -> tuple[Array, Array]:
    """(sum, count) of the softmax cross-entropy over targets != `ignore_index` (and where `where` holds).

    The one cross-entropy of the package: heads divide, training tasks sum across devices first.
    logits (..., classes), labels (...), where (...) bool or None.
    """
    logits = logits.astype(jnp.float32).reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    if where is not None:
        valid = valid & jnp.asarray(where, bool).reshape(-1)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0).astype(jnp.int32))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


def cross_entropy(logits: Array, labels: Array, ignore_index: int = IGNORE_INDEX) -> Array:
    """Mean softmax cross-entropy over targets != `ignore_index`; logits (..., classes), labels (...)."""
    total, count = cross_entropy_sum(logits, labels, ignore_index)
    return total / count


def mse_loss(predictions: Array, targets: Array) -> Array:
    """Mean squared error (`torch.nn.MSELoss`)."""
    diff = predictions.astype(jnp.float32) - targets.astype(jnp.float32)
    return jnp.mean(diff * diff)


def bce_with_logits(logits: Array, targets: Array) -> Array:
    """Mean binary cross-entropy on logits, in the numerically stable form torch uses."""
    x = logits.astype(jnp.float32)
    y = targets.astype(jnp.float32)
    return jnp.mean(jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x))))


def infer_problem_type(num_labels: int, labels_dtype) -> str:
    """transformers' rule: one label -> regression; integer labels -> single-label; else multi-label."""
    if num_labels == 1:
        return "regression"
    if jnp.issubdtype(labels_dtype, jnp.integer):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(logits: Array, labels: Array, problem_type: str | None) -> Array:
    """Loss of a (batch, num_labels) classification/regression head, `problem_type` inferred if None."""
    num_labels = logits.shape[-1]
    problem_type = problem_type or infer_problem_type(num_labels, labels.dtype)
    if problem_type == "regression":
        if num_labels == 1:  # the reference squeezes both sides
            return mse_loss(jnp.squeeze(logits), jnp.squeeze(labels))
        return mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return cross_entropy(logits, labels.reshape(-1))
    if problem_type == "multi_label_classification":
        return bce_with_logits(logits, labels)
    raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")


def causal_lm_loss(logits: Array, labels: Array, ignore_index: int = IGNORE_INDEX) -> Array:
    """Next-token loss: the logit at position t is scored against label t+1 (labels are not pre-shifted)."""
    labels = jnp.asarray(labels)
    pad = jnp.full(labels.shape[:-1] + (1,), ignore_index, labels.dtype)
    shifted = jnp.concatenate([labels[..., 1:], pad], axis=-1)
    return cross_entropy(logits, shifted, ignore_index)


def span_loss_sums(start_logits: Array, end_logits: Array, start_positions: Array,
                   end_positions: Array) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """Extractive QA: the (sum, count) of the start and of the end cross-entropy. Positions outside [0, T) are
    clamped to T, which is then ignored (the reference's way of skipping unanswerable spans)."""
    length = start_logits.shape[-1]
    start = jnp.clip(start_positions.reshape(-1), 0, length)
    end = jnp.clip(end_positions.reshape(-1), 0, length)
    return (cross_entropy_sum(start_logits, start, ignore_index=length),
            cross_entropy_sum(end_logits, end, ignore_index=length))


def span_loss(start_logits: Array, end_logits: Array, start_positions: Array, end_positions: Array) -> Array:
    """The reference's extractive-QA loss: the mean of the start and the end mean cross-entropies."""
    (start_sum, start_count), (end_sum, end_count) = span_loss_sums(start_logits, end_logits, start_positions,
                                                                    end_positions)
    return (start_sum / start_count + end_sum / end_count) / 2


def cosine_scores(hidden: Array, weight: Array) -> Array:
    """Cosine similarity of each row of `hidden` (batch, d) with each column of `weight` (d, classes), float32."""
    def normalize(x, axis):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)
    return normalize(hidden.astype(jnp.float32), 1) @ normalize(weight.astype(jnp.float32), 0)


def am_softmax_sum(hidden: Array, weight: Array, labels: Array, scale: float = 30.0,
                   margin: float = 0.4) -> tuple[Array, Array]:
    """(sum, count) of the additive-margin softmax loss (x-vectors): cosine scores with `margin` subtracted at
    the true class, times `scale`, then cross-entropy; labels -100 are skipped."""
    cos = cosine_scores(hidden, weight)
    onehot = jax.nn.one_hot(labels.reshape(-1), weight.shape[1], dtype=bool)
    return cross_entropy_sum(scale * jnp.where(onehot, cos - margin, cos), labels.reshape(-1))
