"""data2vec v1 pre-training objective as pure functions: config, EMA teacher, targets, head and loss.

Follows fairseq ``examples/data2vec`` (REFERENCE.md §5.1, §5.2, §7 item 11). The student/teacher
encoders live elsewhere; this module only needs their outputs and parameter trees:

1. sample a mask on the host (:mod:`flax_data2vec.masking`, re-exported here);
2. teacher (EMA params, eval mode, unmasked input) -> per-layer FFN outputs -> :func:`make_targets`;
3. student (masked input) -> :class:`RegressionHead` -> :func:`data2vec_loss`;
4. after the optimizer step: :func:`ema_update` with :func:`ema_decay` of the step.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from .masking import (  # noqa: F401  (re-exported)
    compute_span_mask,
    compute_text_mask,
    mask_to_indices,
)
from .schedules import tri_stage_schedule, warmup_cosine

PathPredicate = Callable[[tuple[str, ...]], bool]


@dataclasses.dataclass(frozen=True)
class PretrainBase:
    """What the v1 and 2.0 pre-training configs share: the modality and fairseq's collapse guard (training stops
    when the target or prediction variance falls under its threshold after `collapse_check_after` updates).

    Sources: ``v1`` = ``examples/data2vec/models/data2vec_audio.py`` (the v1 text model has no such check),
    ``v2`` = ``examples/data2vec/models/data2vec2.py`` (``Data2VecMultiConfig`` and ``forward``, both modalities).
    """

    modality: str = "audio"
    # -- collapse guard ---------------------------------------------------------------------------
    check_collapse: bool = True           # v1: audio only (text: False) | v2: both modalities
    min_target_var: float = 0.1           # v1 / v2: min_target_var
    min_pred_var: float = 0.01            # v1 / v2: min_pred_var
    collapse_check_after: int = 5000      # v1 / v2: "if self.num_updates > 5000"

    def __post_init__(self):
        if self.modality not in ("audio", "text"):
            raise ValueError(f"modality must be 'audio' or 'text', got {self.modality!r}")


@dataclasses.dataclass(frozen=True)
class Data2VecPretrainConfig(PretrainBase):
    """Hyper-parameters of data2vec v1 pre-training; use :meth:`audio` / :meth:`text` for released values.

    The class defaults equal :meth:`audio`. Sources (fairseq, per-field comments):
    ``A`` = ``examples/data2vec/config/audio/pretraining/base_librispeech.yaml``,
    ``T`` = ``examples/data2vec/config/text/pretraining/base.yaml``,
    ``M`` = ``examples/data2vec/models/data2vec_{audio,text}.py`` (dataclass defaults and code),
    ``S`` = ``fairseq/optim/lr_scheduler/tri_stage_lr_scheduler.py`` defaults; modality and collapse guard:
    :class:`PretrainBase`.
    """

    # -- masking ------------------------------------------------------------------------------
    mask_prob: float = 0.65              # A: model.mask_prob          | T: task.mask_prob 0.35
    mask_length: int = 10                # A: model.mask_length        | T: task.mask_multiple_length 4
    min_masks: int = 1                   # M (audio apply_mask passes min_masks=1); text has none (0)
    require_same_masks: bool = True      # A: model.require_same_masks
    mask_dropout: float = 0.0            # A: model.mask_dropout
    leave_unmasked_prob: float = 0.0     # T: task.leave_unmasked_prob (BERT style: 0.1)
    random_token_prob: float = 0.0       # T: task.random_token_prob   (BERT style: 0.1)
    # -- targets ------------------------------------------------------------------------------
    top_k: int = 8                       # A: average_top_k_layers 8   | T: 10
    target_norm: str | None = "instance"  # A: instance_norm_target_layer | T: layer_norm_target_layer
    final_target_norm: str | None = None  # M: instance_norm_targets / layer_norm_targets, both False
    # -- head and loss ------------------------------------------------------------------------
    head_layers: int = 1                 # M audio: final_proj Linear(H,H) | T: head_layers 2
    head_init_std: float | None = None   # M audio: torch Linear default | text: init_bert_params 0.02
    loss_beta: float = 0.0               # A: loss_beta 0 (MSE)       | T: loss_beta 4 (smooth L1)
    loss_scale: float | None = None      # A: loss_scale null -> 1/sqrt(H) | T: loss_scale 1
    # -- EMA teacher --------------------------------------------------------------------------
    ema_decay: float = 0.999             # A/T: ema_decay
    ema_end_decay: float = 0.9999        # A/T: ema_end_decay
    ema_anneal_end_step: int = 30_000    # A: 30000 | T: 300000
    # Parameter paths copied from the student instead of averaged (glob on "a/b/c" paths, HF names):
    # A: ema_layers_only -> pos_conv skipped | T: ema_transformer_layers_only -> embeddings skipped.
    ema_copy_patterns: tuple[str, ...] = ("*pos_conv_embed*",)
    # -- optimisation -------------------------------------------------------------------------
    lr: float = 5e-4                     # A: optimization.lr [0.0005] | T: [0.0002]
    lr_schedule: str = "tri_stage"       # A: lr_scheduler tri_stage   | T: cosine
    phase_ratios: tuple[float, float, float] = (0.03, 0.9, 0.07)  # A: phase_ratio
    init_lr_scale: float = 0.01          # S: init_lr_scale default
    final_lr_scale: float = 0.01         # S: final_lr_scale default
    warmup_steps: int = 0                # T: lr_scheduler.warmup_updates 10000 (cosine only)
    max_updates: int = 400_000           # A: max_update 400000 | T: 1000000
    adam_b1: float = 0.9                 # A/T: adam_betas (0.9,0.98)
    adam_b2: float = 0.98
    adam_eps: float = 1e-6               # A/T: adam_eps 1e-06
    weight_decay: float = 0.01           # A/T: weight_decay 0.01 (fairseq Adam decay is decoupled)
    clip_norm: float = 0.0               # A: default 0 (none) | T: clip_norm 5
    # -- data and regularisation of the released recipe ----------------------------------------
    min_sample_size: int = 32_000        # A: task.min_sample_size (shorter utterances are skipped)
    max_sample_size: int = 320_000       # A: task.max_sample_size (longer ones are randomly cropped)
    crop_to_shortest: bool = True        # A: raw_audio_dataset collater with pad=False (batches never padded)
    tokens_per_sample: int = 512         # T: task.tokens_per_sample, sample_break_mode complete_doc
    encoder_layerdrop: float = 0.05      # A: model.encoder_layerdrop 0.05 | T: none (0.0)
    activation_dropout: float = 0.0      # A: Data2VecAudioConfig default 0.0 | T: dropout 0.1 (roberta base)
    # The teacher's input: "unmasked" (the paper) or "masked" (fairseq's released text code: the original
    # tokens at masked positions only, pad elsewhere; fairseq#4881). Audio teachers always see the unmasked input.
    teacher_input: str = "unmasked"

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_norm", "final_target_norm"):
            if getattr(self, name) not in (None, "instance", "layer"):
                raise ValueError(f"{name} must be None, 'instance' or 'layer', got {getattr(self, name)!r}")
        if self.lr_schedule not in ("tri_stage", "cosine"):
            raise ValueError(f"lr_schedule must be 'tri_stage' or 'cosine', got {self.lr_schedule!r}")
        if self.teacher_input not in ("unmasked", "masked"):
            raise ValueError(f"teacher_input must be 'unmasked' or 'masked', got {self.teacher_input!r}")
        if self.top_k < 1 or self.head_layers < 1 or self.mask_length < 1:
            raise ValueError("top_k, head_layers and mask_length must be >= 1")
        object.__setattr__(self, "ema_copy_patterns", tuple(self.ema_copy_patterns))
        object.__setattr__(self, "phase_ratios", tuple(self.phase_ratios))

    @classmethod
    def audio(cls, **overrides: Any) -> Data2VecPretrainConfig:
        """Released data2vec v1 audio base (LibriSpeech 960h) pre-training config."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def text(cls, bert_style: bool = False, **overrides: Any) -> Data2VecPretrainConfig:
        """Released data2vec v1 text base config; ``bert_style`` swaps in 15% / 80-10-10 masking."""
        cfg = cls(
            modality="text", mask_prob=0.35, mask_length=4, min_masks=0, require_same_masks=False,
            top_k=10, target_norm="layer", head_layers=2, head_init_std=0.02, loss_beta=4.0,
            loss_scale=1.0, ema_anneal_end_step=300_000, ema_copy_patterns=("*embeddings*",),
            lr=2e-4, lr_schedule="cosine", warmup_steps=10_000, max_updates=1_000_000, clip_norm=5.0,
            check_collapse=False, encoder_layerdrop=0.0, activation_dropout=0.1)
        if bert_style:  # fairseq masked_lm task defaults (RoBERTa)
            cfg = dataclasses.replace(cfg, mask_prob=0.15, mask_length=1, leave_unmasked_prob=0.1,
                                      random_token_prob=0.1)
        return dataclasses.replace(cfg, **overrides)

    def ema_copy_predicate(self) -> PathPredicate:
        """Predicate on parameter paths that marks leaves copied (shared) rather than averaged."""
        return path_matcher(*self.ema_copy_patterns)


# ---------------------------------------------------------------------------------------------
# EMA teacher
# ---------------------------------------------------------------------------------------------

def ema_decay(step: jax.Array | int, start: float = 0.999, end: float = 0.9999,
              anneal_steps: int = 30_000) -> jax.Array:
    """Teacher decay at ``step``: linear from ``start`` to ``end`` over ``anneal_steps``, then ``end``.

    fairseq ``get_annealed_rate`` / ``set_num_updates``, as an ``optax.linear_schedule``; works on a traced step.
    """
    if anneal_steps <= 0:
        return jnp.asarray(end, jnp.float32)
    return jnp.asarray(optax.linear_schedule(start, end, anneal_steps)(step), jnp.float32)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as plain strings, e.g. ``("encoder", "layers_0", "kernel")``."""
    out = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                out.append(str(getattr(key, attr)))
                break
        else:
            out.append(str(key))
    return tuple(out)


def path_matcher(*patterns: str) -> PathPredicate:
    """Predicate true when ``"/".join(path)`` matches any glob pattern (``fnmatch``)."""
    def matches(path: tuple[str, ...]) -> bool:
        joined = "/".join(path)
        return any(fnmatch.fnmatchcase(joined, p) for p in patterns)
    return matches


def init_teacher(student_params: Any) -> Any:
    """Teacher params: a float32 copy of the student (fairseq deep-copies the student, ``ema_fp32``).

    Fresh buffers, so donating the student params in a jitted step cannot invalidate the teacher.
    """
    return jax.tree_util.tree_map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), student_params)


def ema_update(teacher_params: Any, student_params: Any, decay: jax.Array | float,
               copy: PathPredicate | None = None) -> Any:
    """``decay * teacher + (1 - decay) * student`` per leaf (``optax.incremental_update``), in float32
    whatever the student dtype.

    Leaves whose path satisfies ``copy`` are replaced by the student value instead (fairseq
    ``EMAModule`` ``skip_keys``). Both trees must have the same structure (pass matching subtrees).
    """
    decay = jnp.asarray(decay, jnp.float32)
    student32 = jax.tree_util.tree_map(lambda s: jnp.asarray(s, jnp.float32), student_params)
    teacher32 = jax.tree_util.tree_map(lambda t: jnp.asarray(t, jnp.float32), teacher_params)
    averaged = optax.incremental_update(student32, teacher32, 1.0 - decay)
    if copy is None:
        return averaged
    return copy_params(averaged, student32, copy)


def copy_params(teacher_params: Any, student_params: Any, copy: PathPredicate) -> Any:
    """Teacher tree with the leaves selected by ``copy`` taken from the student (as float32)."""
    def pick(path, t, s):
        return jnp.asarray(s, jnp.float32) if copy(path_names(path)) else t
    return jax.tree_util.tree_map_with_path(pick, teacher_params, student_params)


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------

def _normalise(y: jax.Array, kind: str | None, valid: jax.Array | None, eps: float) -> jax.Array:
    """No-affine instance norm (over time, per example and channel) or layer norm (over channels)."""
    if kind is None:
        return y
    if kind == "layer":
        mean = y.mean(-1, keepdims=True)
        var = jnp.square(y - mean).mean(-1, keepdims=True)
    elif kind == "instance":
        if valid is None:
            mean = y.mean(-2, keepdims=True)
            var = jnp.square(y - mean).mean(-2, keepdims=True)
        else:
            w = valid[..., None].astype(jnp.float32)
            n = jnp.maximum(w.sum(-2, keepdims=True), 1.0)
            mean = (w * y).sum(-2, keepdims=True) / n
            var = (w * jnp.square(y - mean)).sum(-2, keepdims=True) / n
    else:
        raise ValueError(f"unknown norm {kind!r}")
    return (y - mean) * jax.lax.rsqrt(var + eps)


def make_targets(layer_results: Sequence[jax.Array] | jax.Array, top_k: int,
                 norm: str | None = "instance", padding_mask: jax.Array | None = None,
                 final_norm: str | None = None, eps: float = 1e-5) -> jax.Array:
    """data2vec regression targets: mean of the top ``top_k`` normalised teacher layer outputs.

    Args:
      layer_results: per-block ``(B, T, H)`` FFN outputs (before dropout, residual and the block's
        final LayerNorm), as a list or a stacked ``(L, B, T, H)`` array; the last ``top_k`` are used.
      norm: per-layer norm, ``"instance"`` (audio; stats over time with padded frames INCLUDED, as
        fairseq's ``F.instance_norm``), ``"layer"`` (text; over channels) or None. No affine, ``eps``.
      padding_mask: optional ``(B, T)`` bool, True at padding. Only used by instance norm and only if
        given: padded frames are then EXCLUDED from the statistics (a deliberate fairseq deviation).
      final_norm: optional norm applied after averaging (fairseq ``*_norm_targets``, off in v1 base).

    Returns:
      ``(B, T, H)`` float32 targets. Wrap in ``jax.lax.stop_gradient`` (``data2vec_loss`` does).
    """
    num = len(layer_results) if isinstance(layer_results, (list, tuple)) else layer_results.shape[0]
    if not 1 <= top_k <= num:
        raise ValueError(f"top_k must be in [1, {num}], got {top_k}")
    valid = None if padding_mask is None else ~jnp.asarray(padding_mask, bool)
    total = None
    for i in range(num - top_k, num):
        y = _normalise(jnp.asarray(layer_results[i], jnp.float32), norm, valid, eps)
        total = y if total is None else total + y
    return _normalise(total / top_k, final_norm, valid, eps)


# ---------------------------------------------------------------------------------------------
# Head and loss
# ---------------------------------------------------------------------------------------------

def _torch_linear_bias_init(fan_in: int):
    """torch ``nn.Linear`` default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class RegressionHead(nn.Module):
    """Student prediction head.

    ``num_layers == 1`` (audio): one ``Dense(H)`` named ``final_proj``. ``num_layers >= 2`` (text,
    fairseq ``head_layers``): ``dense_0`` = ``Dense(2H)`` -> exact GELU, further ``Dense(2H)`` -> GELU,
    then ``Dense(H)``. ``init_std=None`` uses torch's ``nn.Linear`` default init (audio ``final_proj``);
    text uses ``init_bert_params`` (normal 0.02, zero bias).
    """

    hidden_size: int
    num_layers: int = 1
    init_std: float | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dense(self, features: int, fan_in: int, name: str) -> nn.Dense:
        if self.init_std is None:
            kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
            bias_init = _torch_linear_bias_init(fan_in)
        else:
            kernel_init = nn.initializers.normal(self.init_std)
            bias_init = nn.initializers.zeros
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=kernel_init, bias_init=bias_init, name=name)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.hidden_size
        if self.num_layers == 1:
            return self._dense(h, x.shape[-1], "final_proj")(x)
        width = x.shape[-1]
        for i in range(self.num_layers - 1):
            x = nn.gelu(self._dense(2 * h, width, f"dense_{i}")(x), approximate=False)
            width = 2 * h
        return self._dense(h, width, f"dense_{self.num_layers - 1}")(x)


def gather_positions(x: jax.Array, indices: jax.Array) -> jax.Array:
    """``x[b, indices[b]]`` for ``x`` ``(B, T, H)`` and ``indices`` ``(B, M)``: a static-shape gather."""
    return jnp.take_along_axis(x, indices[..., None].astype(jnp.int32), axis=1)


def _masked_std(y: jax.Array, w: jax.Array) -> jax.Array:
    """fairseq ``compute_var``: mean over dims of sqrt(unbiased var across weighted vectors + 1e-6)."""
    y = y.reshape(-1, y.shape[-1])
    w = w.reshape(-1, 1)
    n = w.sum()
    mean = (w * y).sum(0) / jnp.maximum(n, 1.0)
    var = (w * jnp.square(y - mean)).sum(0) / jnp.maximum(n - 1.0, 1.0)
    return jnp.sqrt(var + 1e-6).mean()


def data2vec_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, loss_beta: float = 0.0,
                  loss_scale: float | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Masked regression loss of data2vec v1.

    Per position: squared error (``loss_beta == 0``) or smooth L1 with ``beta`` summed over the last
    dim, times ``loss_scale`` (``None`` or ``<= 0``: ``1/sqrt(H)``), summed over masked positions and
    divided by their number (fairseq returns the sum and ``sample_size``; its trainer divides).

    The mask is used as weights on all ``(B, T)`` positions instead of boolean gathering, so shapes
    stay static under jit; unmasked positions get weight 0 and no gradient. To save compute, gather
    a fixed number of positions first (:func:`mask_to_indices` + :func:`gather_positions`) and pass
    an all-ones mask. ``target`` is wrapped in ``stop_gradient`` here: the teacher never gets gradients.

    Args:
      pred: ``(..., H)`` head outputs; target: ``(..., H)``; mask: ``(...)`` bool or float weights.

    Returns:
      ``(loss, sample_size, stats)``; stats has ``loss_sum`` (unnormalised, for global normalisation
      across devices/accumulation), ``sample_size``, ``target_var`` and ``pred_var`` (no gradient).
    """
    pred = jnp.asarray(pred, jnp.float32)
    target = jax.lax.stop_gradient(jnp.asarray(target, jnp.float32))
    w = jnp.asarray(mask, jnp.float32)
    if loss_beta == 0:
        per_dim = optax.squared_error(pred, target)
    else:  # torch's smooth L1 with beta is optax's Huber loss with delta=beta, divided by beta
        per_dim = optax.huber_loss(pred, target, delta=loss_beta) / loss_beta
    scale = 1.0 / math.sqrt(pred.shape[-1]) if loss_scale is None or loss_scale <= 0 else loss_scale
    loss_sum = (per_dim.sum(-1) * w).sum() * scale
    sample_size = w.sum()
    loss = loss_sum / jnp.maximum(sample_size, 1.0)
    stats = {
        "loss_sum": loss_sum,
        "sample_size": sample_size,
        "target_var": _masked_std(target, w),
        "pred_var": _masked_std(jax.lax.stop_gradient(pred), w),
    }
    return loss, sample_size, stats


def check_collapse(target_var: float, pred_var: float, step: int, cfg: PretrainBase) -> str | None:
    """Host-side collapse guard: a message if training should stop (fairseq raises), else None."""
    if not cfg.check_collapse or step <= cfg.collapse_check_after:
        return None
    if target_var < cfg.min_target_var:
        return f"target var is {target_var} < {cfg.min_target_var} at update {step}"
    if pred_var < cfg.min_pred_var:
        return f"pred var is {pred_var} < {cfg.min_pred_var} at update {step}"
    return None


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------

def make_lr_schedule(cfg: Data2VecPretrainConfig) -> optax.Schedule:
    """The config's learning-rate schedule (tri-stage for audio, warm-up + cosine to 0 for text)."""
    if cfg.lr_schedule == "tri_stage":
        return tri_stage_schedule(cfg.lr, cfg.max_updates, cfg.phase_ratios,
                                  cfg.init_lr_scale, cfg.final_lr_scale)
    return warmup_cosine(cfg.lr, cfg.warmup_steps, cfg.max_updates)


def make_optimizer(cfg: Data2VecPretrainConfig) -> optax.GradientTransformation:
    """Adam with decoupled weight decay on all params (fairseq ``adam``), optional global-norm clip."""
    adam = optax.adamw(make_lr_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                       weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam) if cfg.clip_norm > 0 else adam
