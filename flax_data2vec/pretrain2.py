"""data2vec 2.0 pre-training objective as pure functions: config, host-side masks, gather / restore of tokens.

Follows fairseq `examples/data2vec/models/data2vec2.py` and `modalities/base.py` (REFERENCE.md §5.3, §5.5.3):

1. on the host, `clone_batch` (M) masks per sample with the same masked count in every row
   (:func:`block_mask` for audio, :func:`random_mask` for text) and their sort ids (:func:`mask_ids`);
2. the teacher (EMA params, eval mode) encodes each sample once; its top-K FFN outputs, instance-normed and
   averaged (v1's `make_targets`), are repeated M times (:func:`repeat_clones`);
3. the student encodes only the kept tokens (:func:`keep_tokens`); the decoder sees them with N(0, std) tokens
   in the masked slots, restored to their order (:func:`restore_tokens`);
4. the loss is v1's `data2vec_loss` on the masked positions; the EMA update and decay are v1's too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .masking import Rng
from .pretrain import PretrainBase, gather_positions, path_names
from .schedules import warmup_cosine


@dataclasses.dataclass(frozen=True)
class Data2Vec2PretrainConfig(PretrainBase):
    """Hyper-parameters of data2vec 2.0 pre-training; :meth:`audio` / :meth:`text` give the released base values.

    The class defaults equal :meth:`audio`. Sources (fairseq, per-field comments):
    ``A`` = ``examples/data2vec/config/v2/base_audio_only_task.yaml``,
    ``T`` = ``examples/data2vec/config/v2/base_text_only_task.yaml``,
    ``M`` = ``examples/data2vec/models/data2vec2.py`` (``Data2VecMultiConfig`` and code),
    ``B`` = ``models/modalities/base.py`` (``D2vModalityConfig``), ``D`` = ``modalities/modules.py``
    (``D2vDecoderConfig``), ``F`` = fairseq's ``OptimizationConfig`` / ``audio_pretraining`` task defaults;
    modality and collapse guard: :class:`~flax_data2vec.pretrain.PretrainBase`.
    """

    # -- masking (student) ---------------------------------------------------------------------
    mask_prob: float = 0.5                # A: modalities.audio.mask_prob | T: modalities.text.mask_prob 0.48
    mask_prob_adjust: float = 0.05        # A: mask_prob_adjust (extra block centres) | T: B default 0
    mask_length: int = 5                  # A: mask_length (block mask) | T: 1 (MAE random_masking)
    mask_noise_std: float = 0.01          # A/T: mask_noise_std (decoder's masked-slot tokens)
    clone_batch: int = 8                  # A/T: model.clone_batch (masks per teacher pass)
    # -- targets ------------------------------------------------------------------------------
    top_k: int = 8                        # A: average_top_k_layers 8 | T: 12
    target_norm: str = "instance"         # A/T: instance_norm_target_layer true (layer_norm_target_layer false)
    # -- loss -----------------------------------------------------------------------------------
    loss_beta: float = 0.0                # A/T: loss_beta 0 (MSE)
    loss_scale: float | None = None       # A: loss_scale null -> 1/sqrt(D) | T: 1
    # -- EMA teacher --------------------------------------------------------------------------
    ema_decay: float = 0.999              # A: ema_decay | T: 0.9999
    ema_end_decay: float = 0.99999        # A/T: ema_end_decay
    ema_anneal_end_step: int = 75_000     # A: 75000 | T: 100000
    ema_encoder_only: bool = False        # A: false (own pos conv, ALiBi scale, context norm) | T: true (blocks)
    # -- decoder (Decoder1d) --------------------------------------------------------------------
    decoder_dim: int = 384                # A: decoder.decoder_dim | T: 768
    decoder_kernel: int = 7               # A: decoder_kernel | T: 9
    decoder_groups: int = 16              # A: decoder_groups | T: 1
    decoder_layers: int = 4               # A: decoder_layers | T: 5
    decoder_input_dropout: float = 0.1    # A/T: decoder.input_dropout
    decoder_residual: bool = True         # D default | T: decoder_residual false
    projection_layers: int = 1            # D default (one Linear) | T: 2 (Linear, GELU, Linear)
    projection_ratio: float = 2.0         # D default | T: 2.0
    # -- optimisation -------------------------------------------------------------------------
    lr: float = 7.5e-4                    # A: optimization.lr [0.00075] | T: [0.0002] (composite, one group)
    decoder_lr: float | None = None       # T's composite optimizer has only the `default` group and M's
    #                                       decoder_group is false: the decoder shares the lr (both yamls)
    lr_schedule: str = "cosine"           # A/T: lr_scheduler cosine (min_lr 0, warm-up from 0)
    warmup_steps: int = 8000              # A: warmup_updates 8000 | T: 4000
    max_updates: int = 400_000            # A: max_update 400000 | T: 1000000
    adam_b1: float = 0.9                  # A/T: adam_betas (0.9, 0.98)
    adam_b2: float = 0.98
    adam_eps: float = 1e-6                # A/T: adam_eps 1e-06
    weight_decay: float = 0.01            # A/T: weight_decay 0.01; M: none on 1-d params, biases, alibi_scale
    clip_norm: float = 0.0                # A: F default 0 (no clipping) | T: clip_norm 1
    # -- data of the released recipe ----------------------------------------------------------
    min_sample_size: int = 32_000         # A: task.min_sample_size
    max_sample_size: int = 320_000        # A: task.max_sample_size (longer clips are randomly cropped)
    crop_to_shortest: bool = True         # A: F enable_padding false -> batches cropped to the shortest clip
    tokens_per_sample: int = 512          # T: task.tokens_per_sample

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must lie in (0, 1), got {self.mask_prob}")
        for name in ("mask_length", "clone_batch", "top_k", "decoder_dim", "decoder_kernel", "decoder_groups",
                     "decoder_layers", "projection_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_dim % self.decoder_groups:
            raise ValueError(f"decoder_dim ({self.decoder_dim}) must be divisible by decoder_groups "
                             f"({self.decoder_groups})")
        if self.target_norm != "instance":
            raise ValueError(f"target_norm {self.target_norm!r}: only 'instance' (both 2.0 base recipes) is supported")
        if self.lr_schedule != "cosine":
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: only 'cosine' (both 2.0 recipes) is supported")

    @classmethod
    def audio(cls, **overrides: Any) -> Data2Vec2PretrainConfig:
        """Released data2vec 2.0 speech base (LibriSpeech 960h) pre-training config."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def text(cls, **overrides: Any) -> Data2Vec2PretrainConfig:
        """Released data2vec 2.0 text base (Books + Wiki) pre-training config."""
        cfg = cls(modality="text", mask_prob=0.48, mask_prob_adjust=0.0, mask_length=1, top_k=12, loss_scale=1.0,
                  ema_decay=0.9999, ema_anneal_end_step=100_000, ema_encoder_only=True, decoder_dim=768,
                  decoder_kernel=9, decoder_groups=1, decoder_layers=5, decoder_residual=False, projection_layers=2,
                  lr=2e-4, warmup_steps=4000, max_updates=1_000_000, clip_norm=1.0)
        return dataclasses.replace(cfg, **overrides)

    def masked_count(self, length: int) -> int:
        """Masked positions per row of `length` tokens: int(T * p) (block mask) or T - int(T * (1 - p)) (MAE)."""
        if self.mask_length == 1:
            return length - int(length * (1.0 - self.mask_prob))
        return int(length * self.mask_prob)

    def keep_count(self, length: int) -> int:
        """Tokens the student encodes per row: static for a given length, so one compile per input length."""
        return length - self.masked_count(length)

    def sample_masks(self, batch: int, length: int, rng: Rng) -> np.ndarray:
        """(batch * clone_batch, length) bool masks, sample-major (row b * M + m is clone m of sample b)."""
        shape = (batch * self.clone_batch, length)
        if self.mask_length == 1:
            return random_mask(shape, rng, self.mask_prob)
        return block_mask(shape, rng, self.mask_prob, self.mask_length, self.mask_prob_adjust)


# ---------------------------------------------------------------------------------------------
# Host-side masks: every row has the same masked count, so the kept tokens have a static shape
# ---------------------------------------------------------------------------------------------

def _choice(rng: Rng, candidates: np.ndarray, count: int) -> np.ndarray:
    return rng.choice(candidates, size=count, replace=False)


def block_mask(shape: tuple[int, int], rng: Rng, mask_prob: float, mask_length: int,
               mask_prob_adjust: float = 0.0) -> np.ndarray:
    """fairseq `compute_block_mask_1d` (overlapping blocks, `require_same_masks`, no dropout): int(T (p + adjust)
    / length) random centres per row, each widened to `mask_length` frames (offset -length // 2, clipped), then
    random frames masked or unmasked until exactly int(T p) per row."""
    rows, length = shape
    centres = rng.integers(0, length, size=(rows, int(length * (mask_prob + mask_prob_adjust) / mask_length)))
    offsets = np.arange(mask_length) - mask_length // 2
    mask = np.zeros(shape, bool)
    frames = np.clip(centres[..., None] + offsets, 0, length - 1).reshape(rows, -1)
    mask[np.repeat(np.arange(rows), frames.shape[1]), frames.reshape(-1)] = True
    target = int(length * mask_prob)
    for row in mask:
        n = int(row.sum())
        if n > target:
            row[_choice(rng, np.flatnonzero(row), n - target)] = False
        elif n < target:
            row[_choice(rng, np.flatnonzero(~row), target - n)] = True
    return mask


def random_mask(shape: tuple[int, int], rng: Rng, mask_prob: float) -> np.ndarray:
    """MAE `random_masking` (fairseq base.py): keep the int(T (1 - p)) positions of lowest uniform noise."""
    rows, length = shape
    keep = int(length * (1.0 - mask_prob))
    order = np.argsort(rng.random(shape), axis=1)
    mask = np.ones(shape, bool)
    np.put_along_axis(mask, order[:, :keep], False, axis=1)
    return mask


class MaskIds(NamedTuple):
    """Sort ids of a mask (fairseq `MaskInfo`): kept positions in order, then masked ones; and each row's seed."""

    mask: np.ndarray         # (R, T) bool, True where the decoder predicts
    ids_keep: np.ndarray     # (R, K) int32 positions the student encodes
    ids_masked: np.ndarray   # (R, T - K) int32 positions the loss scores
    ids_restore: np.ndarray  # (R, T) int32: position t of [kept; masked] order -> index into that order
    seeds: np.ndarray        # (R,) uint32: the row's decoder input dropout and masked-slot noise (see `row_keys`)


def mask_ids(mask: np.ndarray, seeds: np.ndarray | None = None) -> MaskIds:
    """`make_maskinfo`: ids_shuffle = stable argsort of the mask, ids_restore its inverse; equal counts required.
    `seeds` (R,): the rows' random seeds, drawn on the host with the masks (None: the row numbers)."""
    mask = np.asarray(mask, bool)
    counts = mask.sum(-1)
    if mask.ndim != 2 or (counts.size and (counts != counts[0]).any()):
        raise ValueError(f"every row must have the same number of masked positions, got {counts.tolist()}")
    keep = mask.shape[1] - int(counts[0]) if counts.size else mask.shape[1]
    shuffle = np.argsort(mask, axis=1, kind="stable").astype(np.int32)
    restore = np.argsort(shuffle, axis=1, kind="stable").astype(np.int32)
    seeds = np.arange(len(mask)) if seeds is None else np.asarray(seeds)
    if seeds.shape != (len(mask),):
        raise ValueError(f"seeds must have one entry per mask row ({len(mask)}), got shape {seeds.shape}")
    return MaskIds(mask, shuffle[:, :keep], shuffle[:, keep:], restore, seeds.astype(np.uint32))


def draw_seeds(rows: int, rng: Rng) -> np.ndarray:
    """(rows,) uint32 seeds from the host rng that drew the masks."""
    return rng.integers(0, 2 ** 32, size=rows, dtype=np.uint32)


# ---------------------------------------------------------------------------------------------
# Device-side token moves (static shapes)
# ---------------------------------------------------------------------------------------------

def repeat_clones(x: jax.Array, clones: int) -> jax.Array:
    """Each sample repeated `clones` times in place (`repeat_interleave`): row b * M + m = sample b."""
    return jnp.repeat(x, clones, axis=0)


def keep_tokens(x: jax.Array, ids_keep: jax.Array) -> jax.Array:
    """(R, T, D) -> (R, K, D): the tokens the student encodes."""
    return gather_positions(x, ids_keep)


def row_keys(seeds: jax.Array, salt: int) -> jax.Array:
    """(R,) seeds -> (R,) PRNG keys, one stream per `salt`. Each row's randomness is a function of its own seed,
    not of the device it lands on: 1 device, a mesh and pmap draw the same numbers for the same row."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), salt))(seeds)


def row_dropout(x: jax.Array, rate: float, keys: jax.Array) -> jax.Array:
    """Inverted dropout of (R, ...) `x` with one key per row (`row_keys`)."""
    if rate <= 0.0:
        return x
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, x.shape[1:]))(keys)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def restore_tokens(kept: jax.Array, ids_restore: jax.Array, noise_std: float, keys: jax.Array) -> jax.Array:
    """(R, K, D) -> (R, T, D): kept tokens back at their positions, N(0, noise_std) tokens in the masked slots
    (row r's from its key `keys[r]`)."""
    _, k, dim = kept.shape
    noise = noise_std * jax.vmap(lambda key: jax.random.normal(key, (ids_restore.shape[1] - k, dim), jnp.float32))(keys)
    return gather_positions(jnp.concatenate([kept, noise.astype(kept.dtype)], axis=1), ids_restore)


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------

def decays(path: tuple[str, ...], value) -> bool:
    """Weight decay applies: not to 1-d params, biases or the ALiBi scale (data2vec2.py `optim_overrides`)."""
    return np.ndim(value) > 1 and path[-1] != "bias" and "alibi_scale" not in path


def decay_mask(params):
    """The `mask` of `optax.adamw`: True where weight decay applies (see :func:`decays`)."""
    return jax.tree_util.tree_map_with_path(lambda p, v: decays(path_names(p), v), params)


def make_lr_schedule(cfg: Data2Vec2PretrainConfig):
    """Warm-up from 0 then cosine to 0 at `max_updates` (fairseq `cosine` with min_lr 0)."""
    return warmup_cosine(cfg.lr, cfg.warmup_steps, cfg.max_updates)
