"""The shared Transformer stack: LayerDrop as a real branch (unrolled and scanned)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_data2vec.layers import TransformerLayer, TransformerStack

LAYER = dict(hidden_size=16, num_heads=2, intermediate_size=32)
N = 3


def _layer_params(params, i, scan):
    if scan:
        return jax.tree_util.tree_map(lambda t: t[i], params["layers"]["layer"])
    return params[f"layers_{i}"]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_layerdrop_skips_whole_layers_at_random(scan):
    """Each training output is the stack with some subset of layers run (every subset occurs), skipped
    layers report zero FFN output and get zero gradient, and the skip is an XLA conditional."""
    stack = TransformerStack(N, LAYER, layerdrop=0.5, scan_layers=scan)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = stack.init(jax.random.key(1), x, None)["params"]
    outcomes = {}
    for keep in itertools.product((0, 1), repeat=N):
        h = x
        for i in np.flatnonzero(keep):
            h = TransformerLayer(**LAYER).apply({"params": _layer_params(params, i, scan)}, h, None)[0]
        outcomes[keep] = np.asarray(h)

    def train(p, key):
        return stack.apply({"params": p}, x, None, deterministic=False, rngs={"dropout": key})

    step = jax.jit(train)
    seen = {}  # which layers ran -> a key that gave it
    for s in range(48):
        key = jax.random.key(100 + s)
        y, _, extras = step(params, key)
        match = [k for k, h in outcomes.items() if np.allclose(y, h, atol=1e-5)]
        assert len(match) == 1, match
        seen.setdefault(match[0], key)
        for i, kept in enumerate(match[0]):
            assert bool(np.abs(np.asarray(extras[i][2])).max() > 0) == bool(kept)
    assert len(seen) == 2 ** N
    assert "cond" in str(jax.make_jaxpr(train)(params, jax.random.key(0)))

    keep = (1, 0, 1)
    key = seen[keep]
    grads = jax.grad(lambda p: train(p, key)[0].sum())(params)
    for i, kept in enumerate(keep):
        norm = sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(_layer_params(grads, i, scan)))
        assert (norm > 0) == bool(kept), (i, keep, norm)


def test_layerdrop_with_attention_maps_and_at_eval():
    """Asking for attention maps in training still gives every layer's maps; eval ignores layerdrop."""
    stack = TransformerStack(N, LAYER, layerdrop=1.0)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = stack.init(jax.random.key(1), x, None)["params"]
    y, hidden, extras = stack.apply({"params": params}, x, None, deterministic=False, output_attentions=True,
                                    rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(y, x)  # every layer dropped
    assert all(e[0].shape == (2, 2, 5, 5) for e in extras) and len(hidden) == N + 1
    full = TransformerStack(N, LAYER).apply({"params": params}, x, None)[0]
    np.testing.assert_allclose(stack.apply({"params": params}, x, None)[0], full, atol=1e-6)


def test_cudnn_request_falls_back_with_a_warning_when_dropout_is_active():
    """Attention dropout needs the explicit softmax; asking for cuDNN then says so instead of ignoring it."""
    from flax_data2vec.layers import Attention

    attn = Attention(2, 16, dropout_rate=0.1, implementation="cudnn")
    x = jax.random.normal(jax.random.key(0), (1, 4, 16))
    params = attn.clone(implementation=None).init(jax.random.key(1), x)["params"]  # no cuDNN on this CPU
    with pytest.warns(UserWarning, match="cudnn' is not used because attention dropout"):
        attn.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})


def test_cpu_row_attention_and_conv_matmuls_equal_the_plain_program(monkeypatch):
    """The CPU rewrites (attention one batch row at a time, Dense as a width-1 convolution) that base-size shapes
    take give the plain program's outputs and gradients; forced on here, since tiny shapes skip them."""
    import flax_data2vec as fd
    from flax_data2vec import layers

    model = fd.Data2VecTextModel(fd.Data2VecTextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64))
    params = fd.init_params(model, rng=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 64, (3, 10)), jnp.int32)
    mask = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [7], [4]]), jnp.int32)

    def run():  # a fresh trace: the size gates are read while tracing
        def loss(p):
            return model.apply({"params": p}, ids, mask).last_hidden_state
        out, vjp = jax.vjp(loss, params)
        return out, vjp(jnp.ones_like(out))[0]

    plain = jax.jit(run)()
    plain_hlo = jax.jit(lambda: run()).lower().as_text()
    monkeypatch.setattr(layers, "CPU_CONV_MATMUL_MIN_MACS", 0)
    monkeypatch.setattr(layers, "CPU_ROW_ATTENTION_MIN_ROW_LOGITS", 0)
    rewritten = jax.jit(lambda: run())()
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(rewritten)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # the forced program really is another one: the row loop and the convolutions are in it, not in the plain one
    hlo = jax.jit(lambda: run()).lower().as_text()
    assert "while" in hlo and "convolution" in hlo
    assert "while" not in plain_hlo and "convolution" not in plain_hlo


def test_cpu_row_attention_equals_jax_attention_with_biases_and_masks(monkeypatch):
    """The CPU row kernel against `jax.nn.dot_product_attention`: per-row and broadcast biases, padding masks
    (one row with no key left), a causal mask, batch 1; values and gradients."""
    from flax_data2vec import layers

    monkeypatch.setattr(layers, "CPU_ROW_ATTENTION_MIN_ROW_LOGITS", 0)
    rng = np.random.default_rng(0)
    b, t, h, d = 3, 7, 4, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
    keys = jnp.asarray(np.arange(t)[None, :] < np.array([[7], [3], [0]]))
    cases = {
        "plain": (None, None),
        "row bias": (jnp.asarray(rng.standard_normal((b, h, t, t)), jnp.float32), None),
        "shared bias": (jnp.asarray(rng.standard_normal((1, h, t, t)), jnp.float32), None),
        "padding": (None, keys[:, None, None, :]),
        "causal + bias": (jnp.asarray(rng.standard_normal((1, h, t, t)), jnp.float32),
                          jnp.tril(jnp.ones((t, t), bool))[None, None]),
    }
    for name, (bias, mask) in cases.items():
        def ours(q, k, v, bias=bias, mask=mask):
            return layers.dot_product_attention(q, k, v, bias, mask, None)

        def ref(q, k, v, bias=bias, mask=mask):
            return jax.nn.dot_product_attention(q, k, v, bias, mask=mask)

        assert "while" in jax.jit(ours).lower(q, k, v).as_text(), name  # the row loop really ran
        for sl in (slice(None), slice(0, 1)):  # the batch, and batch 1
            args = (q[sl], k[sl], v[sl])
            if bias is not None and bias.shape[0] == b and sl != slice(None):
                continue
            if mask is not None and mask.shape[0] == b and sl != slice(None):
                continue
            np.testing.assert_allclose(jax.jit(ours)(*args), ref(*args), rtol=1e-5, atol=1e-5, err_msg=name)
            g_ours = jax.grad(lambda *a: (ours(*a) ** 2).sum(), argnums=(0, 1, 2))(*args)
            g_ref = jax.grad(lambda *a: (ref(*a) ** 2).sum(), argnums=(0, 1, 2))(*args)
            for x, y in zip(g_ours, g_ref):
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=name)
