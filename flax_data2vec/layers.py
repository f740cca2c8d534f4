"""The Transformer pieces both modalities share: attention, the post-LN layer and the layer stack.

Data2Vec audio and text use the same post-LayerNorm block (attention -> add & norm -> FFN -> add & norm);
they differ only in their front ends. The stack can run unrolled, under `nn.scan` (one compiled
layer) and/or under `nn.remat`; parameter names stay the same so the weight tables apply to all.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# Attention implementations accepted by `jax.nn.dot_product_attention` (None lets JAX choose: XLA).
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, as transformers' `ACT2FN['gelu']`; the tanh form differs by ~5e-4."""
    return jax.nn.gelu(x, approximate=False)


# The CPU-only rewrites below pay on base-size shapes (benchmarks/README.md) and cost a little on tiny ones (loop
# and layout overhead), so they apply from these static sizes on: multiply-adds of one Dense, and elements of
# one batch row's (heads, q, k) attention logits.
CPU_CONV_MATMUL_MIN_MACS = 2 ** 27
# base text 128 tokens (12 x 128 x 128 = 0.2M logits per row) runs 8 % faster by rows (8 x 128 forward, 1,633 vs
# 1,777 ms, interleaved), 512 tokens 12 %; at 32 tokens (12K) the two are level; tiny test models do not take it
CPU_ROW_ATTENTION_MIN_ROW_LOGITS = 100_000


def _conv_matmul(x: Array, kernel: Array, precision) -> Array:
    """(..., K) @ (K, N) as a width-1 convolution over the flattened rows."""
    rows = x.reshape(1, -1, x.shape[-1])
    y = jax.lax.conv_general_dilated(rows, kernel[None], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
                                     precision=precision)
    return y.reshape(x.shape[:-1] + kernel.shape[-1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x: Array, kernel: Array, precision) -> Array:
    # XLA:CPU runs a base-size layer's matmuls ~15% faster through its convolution kernels than as a dot
    # (benchmarks/README.md); other platforms keep the dot.
    return jax.lax.platform_dependent(cpu=lambda: _conv_matmul(x, kernel, precision),
                                      default=lambda: _dot(x, kernel, precision))


def _dot(x: Array, kernel: Array, precision) -> Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _linear_fwd(x, kernel, precision):
    return _linear(x, kernel, precision), (x, kernel)


def _linear_bwd(precision, res, dy):
    x, kernel = res  # the dot's own gradients, on every platform
    _, vjp = jax.vjp(lambda x_, k_: _dot(x_, k_, precision), x, kernel)
    return vjp(dy)


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for `nn.Dense(dot_general=...)`: the same product, on CPU through a 1x1 convolution."""
    if (dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2
            or preferred_element_type is not None):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    if lhs.size * rhs.shape[1] < CPU_CONV_MATMUL_MIN_MACS:
        return _dot(lhs, rhs, precision)
    return _linear(lhs, rhs, precision)


def dense(features: int, std: float, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    """A Linear layer with the reference's normal(0, initializer_range) init."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.normal(std), dot_general=linear_dot_general, name=name)


def layer_norm(eps: float, name: str | None, dtype: Dtype, param_dtype: Dtype, affine: bool = True) -> nn.LayerNorm:
    """LayerNorm with an explicit eps (Flax's default 1e-6 differs from torch's 1e-5)."""
    return nn.LayerNorm(epsilon=eps, use_scale=affine, use_bias=affine, dtype=dtype,
                        param_dtype=param_dtype, name=name)


def mask_to_bias_mask(attention_mask: Array | None) -> Array | None:
    """(batch, keys) 0/1 padding mask -> boolean (batch, 1, 1, keys) mask for attention."""
    if attention_mask is None:
        return None
    return attention_mask.astype(bool)[:, None, None, :]


def _row_attention(q: Array, k: Array, v: Array, bias: Array | None, mask: Array | None) -> Array:
    """One batch row of `jax.nn.dot_product_attention` (q (q, heads, d); bias, mask broadcast to (heads, q, k)).

    Heads-major matmuls, and the softmax normalised after the value product (one pass fewer over the logits);
    masked keys get jax's large negative logit, so a row with no key left averages all values, as jax's does.
    """
    qt, kt, vt = (t.transpose(1, 0, 2) for t in (q * q.shape[-1] ** -0.5, k, v))
    logits = jnp.einsum("hqd,hkd->hqk", qt, kt, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.einsum("hqk,hkd->hqd", e.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    return (out / e.sum(-1, keepdims=True)).astype(v.dtype).transpose(1, 0, 2)


def _batch_rows(t: Array | None, batch: int):
    """(t split into `batch` rows for lax.map, or None) and a function giving row i's (heads|1, q|1, k) slice."""
    if t is None:
        return None, lambda row: None
    if t.ndim == 4 and t.shape[0] == batch:
        return t, lambda row: row
    return None, lambda row: t.reshape(t.shape[-3:]) if t.ndim == 4 else t


def dot_product_attention(q: Array, k: Array, v: Array, bias: Array | None, mask: Array | None,
                          implementation: str | None) -> Array:
    """`jax.nn.dot_product_attention`; on CPU (XLA implementation) run one batch row at a time.

    The same function row by row (`_row_attention`): one row's (heads, q, k) logits stay in cache, where
    XLA:CPU's batched einsum + softmax over the whole (batch, heads, q, k) tensor runs ~2x slower, and its
    per-row call of `jax.nn.dot_product_attention` ~1.6x slower (benchmarks/README.md).
    """
    attend = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
    row_logits = q.shape[2] * q.shape[1] * k.shape[1]  # (heads, q, k) of one row; q is (batch, q, heads, d)
    if implementation not in (None, "xla") or row_logits < CPU_ROW_ATTENTION_MIN_ROW_LOGITS:
        return attend(q, k, v, bias, mask=mask)
    batch = q.shape[0]
    (bias_rows, bias_of), (mask_rows, mask_of) = _batch_rows(bias, batch), _batch_rows(mask, batch)

    def one_row(xs):
        qr, kr, vr, br, mr = xs
        return _row_attention(qr, kr, vr, bias_of(br), mask_of(mr))

    return jax.lax.platform_dependent(
        cpu=lambda: jax.lax.map(one_row, (q, k, v, bias_rows, mask_rows)),
        default=lambda: attend(q, k, v, bias, mask=mask))


class Attention(nn.Module):
    """Multi-head attention; `kv` given means cross-attention. Optional autoregressive KV cache.

    Runs through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU when
    `implementation='cudnn'`; one batch row at a time on CPU, see `dot_product_attention`), except when
    attention weights are requested or attention dropout is active, which need the explicit softmax.
    `bias` (broadcastable to (batch, heads, q, k), e.g. ALiBi) is added to the scaled logits before masking;
    both the 'xla' and the 'cudnn' implementations take it (cuDNN as a (batch|1, heads|1, q, k) tensor), so
    the fast path is kept. `fused_qkv` stores q, k and v as one `qkv` Dense (rows [q; k; v], data2vec 2.0's layout).
    """

    num_heads: int
    hidden_size: int
    dropout_rate: float = 0.0
    init_std: float = 0.02
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fused_qkv: bool = False

    @nn.compact
    def __call__(self, x: Array, kv: Array | None = None, mask: Array | None = None, *, causal: bool = False,
                 deterministic: bool = True, output_attentions: bool = False, decode: bool = False,
                 bias: Array | None = None):
        head_dim = self.hidden_size // self.num_heads
        proj = functools.partial(dense, self.hidden_size, self.init_std, dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))  # noqa: E731
        if self.fused_qkv:
            if kv is not None:
                raise ValueError("fused_qkv attention is self-attention only")
            qkv = dense(3 * self.hidden_size, self.init_std, "qkv", self.dtype, self.param_dtype)(x)
            q, k, v = (split(t) for t in jnp.split(qkv, 3, axis=-1))
        else:
            kv = x if kv is None else kv
            q, k, v = split(proj(name="query")(x)), split(proj(name="key")(kv)), split(proj(name="value")(kv))

        if decode:
            k, v, mask = self._update_cache(k, v, mask)
            causal = False  # the cache mask already encodes causality
        elif causal:
            tq, tk = q.shape[1], k.shape[1]
            causal_mask = jnp.tril(jnp.ones((tq, tk), bool))[None, None]
            mask = causal_mask if mask is None else mask & causal_mask

        dropout_active = self.dropout_rate > 0.0 and not deterministic
        weights = None
        if output_attentions or dropout_active:
            if self.implementation == "cudnn":  # warned once per trace, not per step
                why = "attention weights were requested" if output_attentions else \
                    f"attention dropout ({self.dropout_rate}) is active in training"
                warnings.warn(f"attention_implementation='cudnn' is not used because {why}; the explicit "
                              "softmax runs instead (set attention_dropout=0 for cuDNN attention in training)",
                              stacklevel=2)
            scale = head_dim ** -0.5
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
            if bias is not None:
                logits = logits + bias.astype(jnp.float32)
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
            weights = jax.nn.softmax(logits, axis=-1)
            probs = weights
            if dropout_active:
                probs = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        else:
            out = dot_product_attention(q, k, v, None if bias is None else bias.astype(q.dtype), mask,
                                        self.implementation)
        out = out.reshape(out.shape[:2] + (self.hidden_size,))
        return proj(name="out")(out), (weights if output_attentions else None)

    def _update_cache(self, k: Array, v: Array, mask: Array | None):
        """Write this step's keys/values into the cache; return the full cache and its mask."""
        is_initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not is_initialized:  # first call (init) only sizes the cache
            tq = k.shape[1]
            return k, v, jnp.tril(jnp.ones((tq, tq), bool))[None, None] & (True if mask is None else mask)
        max_len, tq = cached_k.value.shape[1], k.shape[1]
        start = index.value
        k = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, start, 0, 0))
        v = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, start, 0, 0))
        cached_k.value, cached_v.value, index.value = k, v, start + tq
        key_pos = jnp.arange(max_len)[None, :]
        query_pos = start + jnp.arange(tq)[:, None]
        cache_mask = (key_pos <= query_pos)[None, None]
        if mask is not None:  # a (batch, 1, 1, max_len) padding mask over the whole cache
            cache_mask = cache_mask & mask
        return k, v, cache_mask


class TransformerLayer(nn.Module):
    """One post-LN block: self-attention [-> cross-attention] -> feed-forward, each with add & norm.

    Returns the new hidden states and (self-attention weights, cross-attention weights, FFN output).
    The FFN output is taken before dropout, residual and LayerNorm: the data2vec regression target.
    `layer_norm_first=True` gives the pre-LN block of data2vec 2.0 instead: x + attn(norm(x)), then
    x + ffn(norm(x)) (the same two LayerNorms, applied to the branch inputs). `ffn_dropout` (default
    `hidden_dropout`) is the dropout on the FFN output (data2vec 2.0's `post_mlp_drop`).
    """

    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    cross_attention: bool = False
    causal: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    layer_norm_first: bool = False
    fused_qkv: bool = False
    ffn_dropout: float | None = None

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, encoder_hidden_states: Array | None = None,
                 encoder_mask: Array | None = None, deterministic: bool = True, output_attentions: bool = False,
                 decode: bool = False, bias: Array | None = None, query_positions: Array | None = None):
        """query_positions (batch, k): the block's output at those positions only (queries there, keys and
        values everywhere): the same rows for a fraction of the work, where only they are read."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = functools.partial(Attention, self.num_heads, self.hidden_size, self.attention_dropout,
                                      self.init_std, self.attention_implementation, **kw)
        drop = lambda t: nn.Dropout(self.hidden_dropout)(t, deterministic=deterministic)  # noqa: E731
        norm = lambda name: layer_norm(self.layer_norm_eps, name, **kw)  # noqa: E731
        if query_positions is not None and (self.layer_norm_first or self.causal or self.fused_qkv or decode
                                            or bias is not None):
            raise ValueError("query_positions needs a post-LN, bidirectional, unfused layer without decode or bias")
        if self.layer_norm_first:
            return self._pre_ln(x, mask, bias, attention, drop, norm, deterministic, output_attentions)

        kv = None
        if query_positions is not None:
            kv, x = x, jnp.take_along_axis(x, query_positions[..., None].astype(jnp.int32), axis=1)
        h, self_weights = attention(name="attention", fused_qkv=self.fused_qkv)(
            x, kv, mask=mask, causal=self.causal, deterministic=deterministic, output_attentions=output_attentions,
            decode=decode, bias=bias)
        x = norm("attention_norm")(x + drop(h))
        cross_weights = None
        if self.cross_attention:
            h, cross_weights = attention(name="crossattention")(
                x, encoder_hidden_states, mask=encoder_mask, deterministic=deterministic,
                output_attentions=output_attentions)
            x = norm("crossattention_norm")(x + drop(h))
        ffn = self._ffn(x, deterministic)
        x = norm("output_norm")(x + self._ffn_drop(ffn, deterministic))
        return x, (self_weights, cross_weights, ffn)

    def _ffn(self, x: Array, deterministic: bool) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = gelu(dense(self.intermediate_size, self.init_std, "intermediate", **kw)(x))
        h = nn.Dropout(self.activation_dropout)(h, deterministic=deterministic)
        return dense(self.hidden_size, self.init_std, "output", **kw)(h)

    def _ffn_drop(self, ffn: Array, deterministic: bool) -> Array:
        rate = self.hidden_dropout if self.ffn_dropout is None else self.ffn_dropout
        return nn.Dropout(rate)(ffn, deterministic=deterministic)

    def _pre_ln(self, x, mask, bias, attention, drop, norm, deterministic, output_attentions):
        """Pre-LN block (data2vec 2.0 `layer_norm_first`); self-attention only."""
        if self.cross_attention or self.causal:
            raise ValueError("layer_norm_first=True supports bidirectional self-attention only")
        h, weights = attention(name="attention", fused_qkv=self.fused_qkv)(
            norm("attention_norm")(x), mask=mask, deterministic=deterministic, output_attentions=output_attentions,
            bias=bias)
        x = x + drop(h)
        ffn = self._ffn(norm("output_norm")(x), deterministic)
        return x + self._ffn_drop(ffn, deterministic), (weights, None, ffn)


class _ScanBody(nn.Module):
    """Adapts a layer to `nn.scan`'s (carry, xs) -> (carry, ys) form, with layerdrop."""

    layer: Callable[..., nn.Module]
    layerdrop: float

    @nn.compact
    def __call__(self, x, _, mask, encoder_hidden_states, encoder_mask, deterministic, output_attentions, decode,
                 bias=None):
        y, extras = run_layer(self, lambda parent: self.layer(name="layer", parent=parent), x,
                              (mask, encoder_hidden_states, encoder_mask, deterministic, output_attentions, decode,
                               bias), self.layerdrop)
        return y, (y, extras)


def run_layer(parent: nn.Module, make_layer: Callable[[nn.Module], nn.Module], x: Array, args: tuple,
              layerdrop: float):
    """Runs one layer (built under `parent` by `make_layer`) on x, with LayerDrop in training.

    As in transformers, one draw per layer and batch skips the layer with probability `layerdrop`. The skip
    is a real branch (`nn.cond`), so a skipped layer costs no forward or backward compute; a skipped layer
    reports zero FFN output. When attention maps are requested, the layer runs and its output is discarded
    instead, so that every layer returns maps of one shape.
    """
    deterministic, output_attentions = args[3], args[4]
    if deterministic or layerdrop <= 0.0 or parent.is_initializing():
        return make_layer(parent)(x, *args)
    skip = jax.random.uniform(parent.make_rng("dropout")) < layerdrop
    if output_attentions:
        y, extras = make_layer(parent)(x, *args)
        return jnp.where(skip, x, y), extras

    def run(module, x):
        y, (_, _, ffn) = make_layer(module)(x, *args)
        return y.astype(x.dtype), ffn.astype(x.dtype)

    def keep(module, x):
        return x, jnp.zeros_like(x)

    y, ffn = nn.cond(skip, keep, run, parent, x)
    return y, (None, None, ffn)


class TransformerStack(nn.Module):
    """`num_layers` TransformerLayers, unrolled (params `layers_{i}`) or scanned (params `layers`, stacked).

    Returns (last hidden, all hidden states incl. the stack's input, per-layer extras) where the
    extras are (self-attention weights, cross-attention weights, FFN outputs) per layer. `bias` is an
    additive attention bias given to every layer (see `Attention`).
    """

    num_layers: int
    layer_kwargs: dict
    layerdrop: float = 0.0
    scan_layers: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, encoder_hidden_states: Array | None = None,
                 encoder_mask: Array | None = None, deterministic: bool = True, output_attentions: bool = False,
                 decode: bool = False, bias: Array | None = None, last_positions: Array | None = None):
        """last_positions (batch, k): the last layer runs only there (unrolled, eval; see TransformerLayer)."""
        if last_positions is not None and (self.scan_layers or not deterministic):
            raise ValueError("last_positions needs unrolled layers (scan_layers=False) in eval (deterministic)")
        layer_cls: Any = TransformerLayer
        if self.remat:
            # static: deterministic, output_attentions, decode (argument indices count `self` as 0)
            layer_cls = nn.remat(TransformerLayer, static_argnums=(5, 6, 7), prevent_cse=not self.scan_layers)
        layer = functools.partial(layer_cls, **self.layer_kwargs)
        if self.scan_layers:
            scanned = nn.scan(
                _ScanBody, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0,) + (nn.broadcast,) * 7, length=self.num_layers)
            y, (hidden, extras) = scanned(layer, self.layerdrop, name="layers")(
                x, None, mask, encoder_hidden_states, encoder_mask, deterministic, output_attentions, decode, bias)
            hidden_states = (x,) + tuple(hidden[i] for i in range(self.num_layers))
            extras = [jax.tree_util.tree_map(lambda t, i=i: t[i], extras) for i in range(self.num_layers)]
            return y, hidden_states, extras
        hidden_states, extras = [x], []
        for i in range(self.num_layers):
            positions = last_positions if i == self.num_layers - 1 else None
            x, ex = run_layer(self, lambda parent, i=i: layer(name=f"layers_{i}", parent=parent), x,
                              (mask, encoder_hidden_states, encoder_mask, deterministic, output_attentions, decode,
                               bias, positions), self.layerdrop)
            hidden_states.append(x)
            extras.append(ex)
        return x, tuple(hidden_states), extras


def stack_layer_params(params: dict, num_layers: int, prefix: str = "layers_") -> dict:
    """Unrolled `layers_{i}` subtrees -> one scanned `layers/layer` subtree with a leading layer axis."""
    layers = [params[f"{prefix}{i}"] for i in range(num_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith(prefix)}
    rest["layers"] = {"layer": jax.tree_util.tree_map(lambda *t: jnp.stack(t), *layers)}
    return rest


def unstack_layer_params(params: dict, num_layers: int, prefix: str = "layers_") -> dict:
    """Inverse of `stack_layer_params`."""
    stacked = params["layers"]["layer"]
    rest = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        rest[f"{prefix}{i}"] = jax.tree_util.tree_map(lambda t, i=i: t[i], stacked)
    return rest


def weighted_layer_sum(hidden_states: Sequence[Array], layer_weights: Array) -> Array:
    """Softmax-weighted sum over all hidden states (`use_weighted_layer_sum`)."""
    stacked = jnp.stack(hidden_states, axis=1)
    w = jax.nn.softmax(layer_weights.astype(jnp.float32))
    return jnp.einsum("blth,l->bth", stacked, w.astype(stacked.dtype))
