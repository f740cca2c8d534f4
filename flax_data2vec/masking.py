"""Host-side (numpy) mask samplers for data2vec pre-training and SpecAugment fine-tuning.

Masks are drawn on the host with an explicit random generator and passed into the jitted step as
arrays, so the device program has static shapes and no Python randomness (REFERENCE.md §7 item 5).

Conventions: ``padding_mask`` is True at padded positions (fairseq); ``attention_mask`` is 1 at real
positions (transformers); a returned ``mask`` is True where the model must predict the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Rng = np.random.Generator | np.random.RandomState


def _row_lengths(shape: tuple[int, int], padding_mask: np.ndarray | None,
                 lengths: Sequence[int] | np.ndarray | None) -> np.ndarray:
    """Number of real (unpadded) positions per row; padding is assumed to sit at the right end."""
    batch, time = shape
    if lengths is not None:
        out = np.asarray(lengths, dtype=np.int64).reshape(batch)
    elif padding_mask is not None:
        out = time - np.asarray(padding_mask, dtype=bool).reshape(batch, time).sum(-1)
    else:
        out = np.full(batch, time, dtype=np.int64)
    if (out < 0).any() or (out > time).any():
        raise ValueError(f"row lengths must lie in [0, {time}], got {out.tolist()}")
    return out


def compute_span_mask(shape: tuple[int, int], rng: Rng, mask_prob: float, mask_length: int,
                      min_masks: int = 1, *, padding_mask: np.ndarray | None = None,
                      lengths: Sequence[int] | np.ndarray | None = None,
                      require_same_masks: bool = True, mask_dropout: float = 0.0) -> np.ndarray:
    """Span mask of fairseq ``compute_mask_indices`` with ``mask_type="static"``, ``no_overlap=False``.

    Per row of real length ``n``: ``k = max(min_masks, int(mask_prob * n / mask_length + U[0,1)))``
    span starts are drawn without replacement from ``[0, n - mask_length)`` (if that range has no more
    than ``k`` slots it is widened to ``k + 1``), each start masks ``mask_length`` frames, spans may
    overlap and are clipped at ``n``. With ``require_same_masks`` every row is then cut down to the
    batch's smallest masked count by keeping a random subset of its masked frames, so all rows have
    the same number of masked frames (gatherable with :func:`mask_to_indices`). ``mask_dropout``
    unmasks that fraction of each row's masked frames afterwards (0 in data2vec v1).

    Args:
      shape: ``(B, T)``.
      rng: seeded ``np.random.Generator`` (or ``RandomState``).
      padding_mask: optional ``(B, T)`` bool, True at padded frames (right padding).
      lengths: optional ``(B,)`` real lengths; takes precedence over ``padding_mask``.

    Returns:
      ``(B, T)`` bool, True at masked frames. All False when ``mask_prob <= 0``.
    """
    batch, time = shape
    mask = np.zeros((batch, time), dtype=bool)
    if mask_prob <= 0 or batch == 0:
        return mask
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    row_len = _row_lengths(shape, padding_mask, lengths)
    offsets = np.arange(mask_length)

    per_row = []
    for i in range(batch):
        n = int(row_len[i])
        num = max(min_masks, int(mask_prob * n / float(mask_length) + rng.random()))
        span = mask_length
        if n - span <= num:  # too few start slots: fairseq widens the range to num + 1 slots
            span = n - num - 1
        starts = np.asarray(rng.choice(n - span, num, replace=False), dtype=np.int64)
        idx = (starts[:, None] + offsets[None, :]).reshape(-1)
        idx = np.unique(idx[idx < n])
        if len(idx) >= n:
            raise ValueError(f"row {i} would be entirely masked (length {n}, mask_prob {mask_prob}, "
                             f"mask_length {mask_length})")
        per_row.append(idx)

    target = min(len(idx) for idx in per_row) if require_same_masks else None
    for i, idx in enumerate(per_row):
        if target is not None and len(idx) > target:
            idx = rng.choice(idx, target, replace=False)
        mask[i, idx] = True
        if mask_dropout > 0:
            masked = np.flatnonzero(mask[i])
            holes = int(np.rint(len(masked) * mask_dropout))
            mask[i, rng.choice(masked, holes, replace=False)] = False
    return mask


def compute_text_mask(input_ids: np.ndarray, rng: Rng, *, mask_token_id: int,
                      special_ids: Sequence[int] = (0, 1, 2), attention_mask: np.ndarray | None = None,
                      mask_prob: float = 0.35, mask_length: int = 4, leave_unmasked_prob: float = 0.0,
                      random_token_prob: float = 0.0, vocab_size: int | None = None,
                      bert_style: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Token masking of fairseq ``MaskTokensDataset`` (``masked_lm`` task), for data2vec text.

    Defaults are the released data2vec text base config (``config/text/pretraining/base.yaml``:
    ``mask_prob 0.35``, ``mask_multiple_length 4``, ``leave_unmasked_prob 0``, ``random_token_prob 0``).
    Per row, over its ``n`` eligible tokens (non-padding and not in ``special_ids``, taken in order):
    ``k = int(mask_prob * n / mask_length + U[0,1))`` span starts are drawn without replacement from
    ``[0, n)``, each covers ``mask_length`` eligible tokens, clipped at ``n``. Of the selected tokens a
    fraction ``leave_unmasked_prob`` is kept and ``random_token_prob`` replaced by a uniformly drawn
    non-special token; the rest become ``mask_token_id``.

    ``bert_style=True`` overrides to BERT/RoBERTa masking: 15% of tokens (``mask_length 1``), of which
    80% -> ``<mask>``, 10% random, 10% kept. Unlike fairseq (which can mask ``<s>``/``</s>``), special
    tokens and padding are never selected: sampling runs over the eligible tokens only.

    Args:
      input_ids: ``(B, T)`` int token ids.
      special_ids: ids that are never masked (RoBERTa ``<s>``=0, ``<pad>``=1, ``</s>``=2).
      attention_mask: optional ``(B, T)``, 1 at real tokens.
      vocab_size: needed when ``random_token_prob > 0``.

    Returns:
      ``(masked_input_ids, mask)``: ids with replacements applied and a ``(B, T)`` bool that is True at
      every selected position (replaced by ``<mask>``, random, or kept): the positions to predict.
      fairseq's data2vec text model predicts where ``src == <mask>``; with the released config
      (no random/kept tokens) the two coincide.
    """
    if bert_style:
        mask_prob, mask_length, leave_unmasked_prob, random_token_prob = 0.15, 1, 0.1, 0.1
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {ids.shape}")
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    batch, time = ids.shape
    eligible = ~np.isin(ids, np.asarray(list(special_ids), dtype=ids.dtype))
    if attention_mask is not None:
        eligible &= np.asarray(attention_mask).astype(bool)

    mask = np.zeros((batch, time), dtype=bool)
    offsets = np.arange(mask_length)
    for i in range(batch):
        pos = np.flatnonzero(eligible[i])
        n = len(pos)
        if n == 0 or mask_prob <= 0:
            continue
        num = min(n, int(mask_prob * n / float(mask_length) + rng.random()))
        starts = np.asarray(rng.choice(n, num, replace=False), dtype=np.int64)
        idx = (starts[:, None] + offsets[None, :]).reshape(-1)
        mask[i, pos[idx[idx < n]]] = True

    masked_ids = ids.copy()
    replace = mask.copy()
    random_mask = np.zeros_like(mask)
    other_prob = leave_unmasked_prob + random_token_prob
    if other_prob > 0:
        other = mask & (rng.random((batch, time)) < other_prob)
        keep_frac = leave_unmasked_prob / other_prob
        keep = other & (rng.random((batch, time)) < keep_frac)
        random_mask = other & ~keep
        replace &= ~other
    masked_ids[replace] = mask_token_id
    num_random = int(random_mask.sum())
    if num_random:
        if vocab_size is None:
            raise ValueError("vocab_size is required when random_token_prob > 0")
        excluded = {int(s) for s in special_ids} | {int(mask_token_id)}
        candidates = np.asarray([t for t in range(vocab_size) if t not in excluded], dtype=ids.dtype)
        masked_ids[random_mask] = candidates[rng.integers(0, len(candidates), num_random)
                                             if isinstance(rng, np.random.Generator)
                                             else rng.randint(0, len(candidates), num_random)]
    return masked_ids, mask


def mask_to_indices(mask: np.ndarray) -> np.ndarray:
    """``(B, M)`` int32 positions of the True entries of a mask with the same count ``M`` in every row.

    With ``require_same_masks`` the span mask satisfies this, so the masked frames can be gathered into
    a static ``(B, M, H)`` array inside jit (see ``pretrain.gather_positions``).
    """
    mask = np.asarray(mask, dtype=bool)
    counts = mask.sum(-1)
    if mask.ndim != 2 or (counts.size and (counts != counts[0]).any()):
        raise ValueError(f"every row must have the same number of masked positions, got {counts.tolist()}")
    width = int(counts[0]) if counts.size else 0
    return np.nonzero(mask)[1].reshape(mask.shape[0], width).astype(np.int32)
