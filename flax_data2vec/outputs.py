"""Model outputs as `flax.struct` dataclasses, with transformers' field names.

Fields a call did not ask for are None. They are pytrees, so outputs pass through `jit`/`pmap`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class BaseModelOutput:
    """Encoder output. `hidden_states` holds the stack's input then each layer's output;
    `layer_results` (data2vec targets) holds each layer's FFN output before residual and LayerNorm."""

    last_hidden_state: Array
    extract_features: Optional[Array] = None
    pooler_output: Optional[Array] = None
    hidden_states: Optional[Tuple[Array, ...]] = None
    attentions: Optional[Tuple[Array, ...]] = None
    cross_attentions: Optional[Tuple[Array, ...]] = None
    layer_results: Optional[Tuple[Array, ...]] = None
    feature_mask: Optional[Array] = None  # (batch, frames) bool: the frames that are real audio (audio only)
    projected_features: Optional[Array] = None  # audio: projected features before masking (data2vec teacher input)


@struct.dataclass
class HeadOutput:
    """Output of a classification / CTC / LM head (transformers' `*ClassifierOutput`, `CausalLMOutput`...)."""

    logits: Array
    loss: Optional[Array] = None
    hidden_states: Optional[Tuple[Array, ...]] = None
    attentions: Optional[Tuple[Array, ...]] = None
    cross_attentions: Optional[Tuple[Array, ...]] = None


@struct.dataclass
class XVectorOutput:
    """Output of the x-vector head: AM-softmax logits and the speaker embeddings."""

    logits: Array
    embeddings: Array
    loss: Optional[Array] = None
    hidden_states: Optional[Tuple[Array, ...]] = None
    attentions: Optional[Tuple[Array, ...]] = None


@struct.dataclass
class QuestionAnsweringOutput:
    """Span-extraction output: per-token start and end logits."""

    start_logits: Array
    end_logits: Array
    loss: Optional[Array] = None
    hidden_states: Optional[Tuple[Array, ...]] = None
    attentions: Optional[Tuple[Array, ...]] = None
