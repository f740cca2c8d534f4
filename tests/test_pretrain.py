"""data2vec v1 objective: config, mask samplers, EMA, targets, head and loss."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_data2vec import pretrain as P
from flax_data2vec.masking import (
    compute_span_mask,
    compute_text_mask,
    mask_to_indices,
)

# ---------------------------------------------------------------------------------------------
# helpers: exact coverage of "n starts without replacement from N slots, spans of length L"
# ---------------------------------------------------------------------------------------------

def _p_uncovered(num_slots, covering, num_starts):
    """P(no chosen start among `covering` specific slots) = C(N-k, n) / C(N, n)."""
    if num_starts > num_slots - covering:
        return 0.0
    return math.comb(num_slots - covering, num_starts) / math.comb(num_slots, num_starts)


def _expected_coverage(n, num_slots, span, c, min_masks=0):
    """Mean fraction of the n positions covered when the start count is int(c + U), at least min_masks."""
    lo = math.floor(c)
    probs = {max(lo, min_masks): 1 - (c - lo)}
    probs[max(lo + 1, min_masks)] = probs.get(max(lo + 1, min_masks), 0.0) + (c - lo)
    total = 0.0
    for num, pr in probs.items():
        for t in range(n):
            k = max(0, min(t, num_slots - 1) - max(0, t - span + 1) + 1)
            total += pr * (1 - _p_uncovered(num_slots, k, num))
    return total / n


def _runs(row):
    """Lengths of the maximal runs of True in a 1-D bool array."""
    padded = np.concatenate([[0], row.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return edges[1::2] - edges[0::2]


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def test_config_released_defaults():
    a = P.Data2VecPretrainConfig.audio()
    assert (a.mask_prob, a.mask_length, a.min_masks, a.require_same_masks) == (0.65, 10, 1, True)
    assert (a.top_k, a.target_norm, a.loss_beta, a.loss_scale, a.head_layers) == (8, "instance", 0.0, None, 1)
    assert (a.ema_decay, a.ema_end_decay, a.ema_anneal_end_step) == (0.999, 0.9999, 30_000)
    assert (a.lr, a.lr_schedule, a.phase_ratios, a.init_lr_scale, a.final_lr_scale) == (
        5e-4, "tri_stage", (0.03, 0.9, 0.07), 0.01, 0.01)
    assert (a.max_updates, a.adam_b1, a.adam_b2, a.adam_eps, a.weight_decay, a.clip_norm) == (
        400_000, 0.9, 0.98, 1e-6, 0.01, 0.0)
    assert (a.min_target_var, a.min_pred_var, a.collapse_check_after) == (0.1, 0.01, 5000)
    t = P.Data2VecPretrainConfig.text()
    assert (t.mask_prob, t.mask_length, t.leave_unmasked_prob, t.random_token_prob) == (0.35, 4, 0.0, 0.0)
    assert (t.top_k, t.target_norm, t.loss_beta, t.loss_scale, t.head_layers) == (10, "layer", 4.0, 1.0, 2)
    assert (t.ema_anneal_end_step, t.lr, t.lr_schedule, t.warmup_steps, t.max_updates, t.clip_norm) == (
        300_000, 2e-4, "cosine", 10_000, 1_000_000, 5.0)
    b = P.Data2VecPretrainConfig.text(bert_style=True, top_k=6)
    assert (b.mask_prob, b.mask_length, b.leave_unmasked_prob, b.random_token_prob, b.top_k) == (
        0.15, 1, 0.1, 0.1, 6)
    hash(a), hash(t)
    with pytest.raises(ValueError):
        P.Data2VecPretrainConfig(target_norm="batch")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.lr = 1.0
    assert a.ema_copy_predicate()(("encoder", "pos_conv_embed", "conv_0", "kernel"))
    assert not a.ema_copy_predicate()(("encoder", "layers_0", "attention", "kernel"))
    assert t.ema_copy_predicate()(("embeddings", "word_embeddings", "embedding"))


def test_lr_schedule_and_optimizer_from_config():
    a = P.Data2VecPretrainConfig.audio()
    sched = P.make_lr_schedule(a)
    assert float(sched(0)) == pytest.approx(5e-6, rel=1e-4)
    assert float(sched(12_000)) == pytest.approx(5e-4, rel=1e-6)
    t = P.Data2VecPretrainConfig.text()
    assert float(P.make_lr_schedule(t)(10_000)) == pytest.approx(2e-4, rel=1e-6)
    params = {"w": jnp.ones((3,))}
    for cfg in (a, t):
        opt = P.make_optimizer(cfg)
        updates, _ = opt.update({"w": jnp.full((3,), 100.0)}, opt.init(params), params)
        assert np.all(np.isfinite(np.asarray(updates["w"])))


# ---------------------------------------------------------------------------------------------
# audio span mask
# ---------------------------------------------------------------------------------------------

def test_span_mask_coverage_matches_exact_expectation():
    rng = np.random.default_rng(0)
    n, draws = 300, 1500
    cov = np.mean([compute_span_mask((1, n), rng, 0.65, 10).mean() for _ in range(draws)])
    expected = _expected_coverage(n, n - 10, 10, 0.65 * n / 10, min_masks=1)
    assert abs(cov - expected) < 0.005
    # the long-sequence value quoted in REFERENCE.md: 1 - (1 - 0.065)^10 ~ 49%
    assert abs(_expected_coverage(2000, 1990, 10, 130.0) - (1 - (1 - 0.065 * 2000 / 1990) ** 10)) < 0.005
    long_cov = np.mean([compute_span_mask((1, 2000), rng, 0.65, 10).mean() for _ in range(100)])
    assert abs(long_cov - 0.49) < 0.015


def test_span_mask_span_counts_and_lengths():
    rng = np.random.default_rng(1)
    # mask_length 1: no overlaps possible, so the masked count is exactly int(p*n/L + U)
    counts = np.array([compute_span_mask((1, 400), rng, 0.3, 1, min_masks=0).sum() for _ in range(2000)])
    assert set(np.unique(counts)) <= {120}
    counts = np.array([compute_span_mask((1, 401), rng, 0.25, 1, min_masks=0).sum() for _ in range(2000)])
    assert set(np.unique(counts)) <= {100, 101} and abs(counts.mean() - 100.25) < 0.05
    # starts lie in [0, n - L), so every run is at least L long and never clipped
    for _ in range(50):
        row = compute_span_mask((1, 250), rng, 0.65, 10, require_same_masks=False)[0]
        runs = _runs(row)
        assert runs.min() >= 10
    # short rows still get min_masks spans
    assert compute_span_mask((1, 30), rng, 0.01, 10, min_masks=1).sum() == 10
    assert not compute_span_mask((4, 50), rng, 0.0, 10).any()


def test_span_mask_padding_and_same_masks():
    rng = np.random.default_rng(2)
    lengths = np.array([200, 150, 120, 200])
    pad = np.arange(200)[None, :] >= lengths[:, None]
    for _ in range(50):
        m = compute_span_mask((4, 200), rng, 0.65, 10, padding_mask=pad)
        assert m.dtype == bool and m.shape == (4, 200)
        assert not (m & pad).any()
        counts = m.sum(-1)
        assert (counts == counts[0]).all() and counts[0] > 0
        m2 = compute_span_mask((4, 200), rng, 0.65, 10, lengths=lengths, require_same_masks=False)
        assert not (m2 & pad).any()
    a = compute_span_mask((3, 100), np.random.default_rng(7), 0.65, 10)
    b = compute_span_mask((3, 100), np.random.default_rng(7), 0.65, 10)
    np.testing.assert_array_equal(a, b)


def test_mask_to_indices_and_gather():
    rng = np.random.default_rng(3)
    m = compute_span_mask((3, 80), rng, 0.65, 10)
    idx = mask_to_indices(m)
    assert idx.shape == (3, m.sum() // 3)
    x = jnp.arange(3 * 80 * 2, dtype=jnp.float32).reshape(3, 80, 2)
    got = P.gather_positions(x, jnp.asarray(idx))
    np.testing.assert_array_equal(np.asarray(got).reshape(-1, 2), np.asarray(x)[m])
    with pytest.raises(ValueError):
        mask_to_indices(np.array([[True, False], [True, True]]))


# ---------------------------------------------------------------------------------------------
# text mask
# ---------------------------------------------------------------------------------------------

def _text_batch(rng, batch=32, time=260, vocab=1000):
    ids = rng.integers(4, vocab - 1, size=(batch, time))
    lengths = rng.integers(time // 2, time + 1, size=batch)
    attn = (np.arange(time)[None] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = 0
    ids[np.arange(batch), lengths - 1] = 2
    ids[attn == 0] = 1
    return ids, attn


def test_text_span_mask_never_touches_specials_and_coverage():
    rng = np.random.default_rng(4)
    mask_id, covered, expected, total = 999, 0.0, 0.0, 0
    for _ in range(30):
        ids, attn = _text_batch(rng)
        out, m = compute_text_mask(ids, rng, mask_token_id=mask_id, attention_mask=attn)
        special = np.isin(ids, [0, 1, 2]) | (attn == 0)
        assert not (m & special).any()
        np.testing.assert_array_equal(out[m], mask_id)
        np.testing.assert_array_equal(out[~m], ids[~m])
        for i in range(len(ids)):
            n = int((~special[i]).sum())
            covered += m[i].sum()
            expected += n * _expected_coverage(n, n, 4, 0.35 * n / 4)
            total += n
    frac = covered / total
    assert abs(frac - expected / total) < 0.006
    assert abs(frac - (1 - (1 - 0.35 / 4) ** 4)) < 0.02  # ~30.7% of real tokens


def test_text_bert_style_fractions():
    rng = np.random.default_rng(5)
    mask_id, vocab = 999, 1000
    sel = rep = rnd = kept = real = 0
    for _ in range(20):
        ids, attn = _text_batch(rng, vocab=vocab)
        out, m = compute_text_mask(ids, rng, mask_token_id=mask_id, attention_mask=attn, bert_style=True,
                                   vocab_size=vocab)
        special = np.isin(ids, [0, 1, 2]) | (attn == 0)
        assert not (m & special).any()
        np.testing.assert_array_equal(out[~m], ids[~m])
        assert not np.isin(out[m & (out != mask_id)], [0, 1, 2, mask_id]).any()
        real += (~special).sum()
        sel += m.sum()
        rep += (m & (out == mask_id)).sum()
        kept += (m & (out == ids)).sum()
        rnd += (m & (out != mask_id) & (out != ids)).sum()
    assert abs(sel / real - 0.15) < 0.003
    assert abs(rep / sel - 0.8) < 0.015
    assert abs(kept / sel - 0.1) < 0.012
    assert abs(rnd / sel - 0.1) < 0.012
    with pytest.raises(ValueError):
        compute_text_mask(ids, rng, mask_token_id=mask_id, random_token_prob=0.5)


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------

def test_ema_decay_schedule():
    n = 30_000
    vals = [float(P.ema_decay(s, 0.999, 0.9999, n)) for s in (0, n // 2, n, 2 * n)]
    np.testing.assert_allclose(vals, [0.999, 0.99945, 0.9999, 0.9999], rtol=0, atol=1e-7)
    traced = jax.jit(lambda s: P.ema_decay(s, 0.999, 0.9999, n))(jnp.asarray(n // 4))
    assert float(traced) == pytest.approx(0.999 + 0.0009 / 4, abs=1e-7)
    assert float(P.ema_decay(5, 0.999, 0.9999, 0)) == pytest.approx(0.9999)


def test_ema_update_math_copy_and_dtype():
    teacher = {"encoder": {"pos_conv_embed": {"kernel": jnp.zeros((2,))}, "layers_0": {"kernel": jnp.ones((2,))}}}
    student = {"encoder": {"pos_conv_embed": {"kernel": jnp.full((2,), 3.0, jnp.bfloat16)},
                           "layers_0": {"kernel": jnp.full((2,), 3.0, jnp.bfloat16)}}}
    out = P.ema_update(teacher, student, 0.9, copy=P.path_matcher("*pos_conv_embed*"))
    np.testing.assert_allclose(np.asarray(out["encoder"]["layers_0"]["kernel"]), 0.9 * 1 + 0.1 * 3, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["encoder"]["pos_conv_embed"]["kernel"]), 3.0)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(out))
    plain = P.ema_update(teacher, student, jnp.asarray(0.5))
    np.testing.assert_allclose(np.asarray(plain["encoder"]["pos_conv_embed"]["kernel"]), 1.5)
    jitted = jax.jit(lambda t, s, d: P.ema_update(t, s, d))(teacher, student, 0.9)
    np.testing.assert_allclose(np.asarray(jitted["encoder"]["layers_0"]["kernel"]), 1.2, rtol=1e-6)
    copied = P.copy_params(teacher, student, P.path_matcher("*pos_conv_embed*"))
    np.testing.assert_allclose(np.asarray(copied["encoder"]["pos_conv_embed"]["kernel"]), 3.0)
    np.testing.assert_allclose(np.asarray(copied["encoder"]["layers_0"]["kernel"]), 1.0)
    init = P.init_teacher(student)
    assert init["encoder"]["layers_0"]["kernel"].dtype == jnp.float32
    f32 = {"w": jnp.ones((3,))}
    assert P.init_teacher(f32)["w"] is not f32["w"]


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------

def _np_instance_norm(y, eps=1e-5):  # y (B, T, H): stats over T
    return (y - y.mean(1, keepdims=True)) / np.sqrt(y.var(1, keepdims=True) + eps)


def _np_layer_norm(y, eps=1e-5):
    return (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + eps)


def test_make_targets_matches_numpy_and_torch():
    rng = np.random.default_rng(6)
    layers = [rng.normal(loc=i, scale=1 + i, size=(2, 7, 5)).astype(np.float32) for i in range(6)]
    ref_inst = np.mean([_np_instance_norm(y.astype(np.float64)) for y in layers[-4:]], 0)
    ref_ln = np.mean([_np_layer_norm(y.astype(np.float64)) for y in layers[-3:]], 0)
    got_inst = P.make_targets([jnp.asarray(y, jnp.bfloat16) for y in layers], 4, "instance")
    np.testing.assert_allclose(np.asarray(P.make_targets(layers, 4, "instance")), ref_inst, atol=1e-5)
    np.testing.assert_allclose(np.asarray(P.make_targets(np.stack(layers), 4, "instance")), ref_inst, atol=1e-5)
    np.testing.assert_allclose(np.asarray(P.make_targets(layers, 3, "layer")), ref_ln, atol=1e-5)
    assert got_inst.dtype == jnp.float32 and got_inst.shape == (2, 7, 5)  # bf16 layers, f32 targets
    np.testing.assert_allclose(np.asarray(got_inst), ref_inst, atol=0.05)
    np.testing.assert_allclose(np.asarray(P.make_targets(layers, 2, None)), np.mean(layers[-2:], 0), atol=1e-6)
    # padding: included in the statistics by default (fairseq), excluded only when padding_mask is passed
    pad = np.zeros((2, 7), bool)
    pad[1, 4:] = True
    excl = np.asarray(P.make_targets(layers, 1, "instance", padding_mask=pad))
    np.testing.assert_allclose(excl[1, :4], _np_instance_norm(layers[-1][1:2, :4].astype(np.float64))[0], atol=1e-5)
    np.testing.assert_allclose(excl[0], _np_instance_norm(layers[-1].astype(np.float64))[0], atol=1e-5)
    incl = np.asarray(P.make_targets(layers, 1, "instance"))
    np.testing.assert_allclose(incl[1], _np_instance_norm(layers[-1].astype(np.float64))[1], atol=1e-5)
    assert np.abs(incl[1, :4] - excl[1, :4]).max() > 1e-3
    with pytest.raises(ValueError):
        P.make_targets(layers, 7)
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    tl = [torch.from_numpy(y) for y in layers[-4:]]
    ref_t = sum(F.instance_norm(y.transpose(1, 2)).transpose(1, 2) for y in tl) / 4
    np.testing.assert_allclose(np.asarray(P.make_targets(layers, 4, "instance")), ref_t.numpy(), atol=1e-5)
    ref_t = sum(F.layer_norm(torch.from_numpy(y), (5,)) for y in layers[-3:]) / 3
    np.testing.assert_allclose(np.asarray(P.make_targets(layers, 3, "layer")), ref_t.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# head and loss
# ---------------------------------------------------------------------------------------------

def test_regression_head_shapes_and_gelu():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    audio = P.RegressionHead(8)
    params = audio.init(jax.random.PRNGKey(1), x)["params"]
    assert set(params) == {"final_proj"} and params["final_proj"]["kernel"].shape == (8, 8)
    text = P.RegressionHead(8, num_layers=2, init_std=0.02)
    params = text.init(jax.random.PRNGKey(1), x)["params"]
    assert params["dense_0"]["kernel"].shape == (8, 16) and params["dense_1"]["kernel"].shape == (16, 8)
    assert not np.asarray(params["dense_0"]["bias"]).any()
    h = x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"]
    h = 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2)))
    ref = h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]
    np.testing.assert_allclose(np.asarray(text.apply({"params": params}, x)), np.asarray(ref), atol=1e-5)


def _np_loss(pred, tgt, mask, beta, scale):
    d = pred - tgt
    if beta == 0:
        per = d ** 2
    else:
        per = np.where(np.abs(d) < beta, 0.5 * d ** 2 / beta, np.abs(d) - 0.5 * beta)
    per = per.sum(-1)[mask]
    return per.sum() * scale / mask.sum()


def test_loss_math_and_stats():
    rng = np.random.default_rng(8)
    pred = rng.normal(size=(2, 6, 4)).astype(np.float32) * 5
    tgt = rng.normal(size=(2, 6, 4)).astype(np.float32)
    mask = rng.random((2, 6)) < 0.5
    mask[0, 0] = True
    loss, n, stats = P.data2vec_loss(pred, tgt, mask)
    assert float(n) == mask.sum()
    np.testing.assert_allclose(float(loss), _np_loss(pred, tgt, mask, 0, 1 / 2), rtol=1e-5)
    np.testing.assert_allclose(float(stats["loss_sum"]), float(loss) * mask.sum(), rtol=1e-5)
    loss4, _, _ = P.data2vec_loss(pred, tgt, mask, loss_beta=4.0, loss_scale=1.0)
    np.testing.assert_allclose(float(loss4), _np_loss(pred, tgt, mask, 4.0, 1.0), rtol=1e-5)
    loss_neg, _, _ = P.data2vec_loss(pred, tgt, mask, loss_beta=4.0, loss_scale=-1.0)  # <= 0 -> 1/sqrt(H)
    np.testing.assert_allclose(float(loss_neg), _np_loss(pred, tgt, mask, 4.0, 0.5), rtol=1e-5)
    for key, arr in (("target_var", tgt), ("pred_var", pred)):
        ref = np.sqrt(arr[mask].astype(np.float64).var(0, ddof=1) + 1e-6).mean()
        np.testing.assert_allclose(float(stats[key]), ref, rtol=1e-5)
    torch = pytest.importorskip("torch")
    sl1 = torch.nn.functional.smooth_l1_loss(torch.from_numpy(pred[mask]), torch.from_numpy(tgt[mask]),
                                             reduction="none", beta=4.0).sum(-1).sum() / mask.sum()
    np.testing.assert_allclose(float(loss4), float(sl1), rtol=1e-5)


def test_loss_only_masked_positions_and_static_gather():
    rng = np.random.default_rng(9)
    pred = jnp.asarray(rng.normal(size=(2, 10, 4)), jnp.float32)
    tgt = jnp.asarray(rng.normal(size=(2, 10, 4)), jnp.float32)
    mask = np.zeros((2, 10), bool)
    mask[0, [1, 4, 5]] = True
    mask[1, [0, 2, 9]] = True
    fn = jax.jit(lambda p, t, m: P.data2vec_loss(p, t, m)[0])
    base = fn(pred, tgt, mask)
    changed = pred.at[~mask].set(1e3)
    assert float(fn(changed, tgt, mask)) == pytest.approx(float(base), rel=1e-6)
    grads = jax.grad(fn)(pred, tgt, mask)
    assert not np.asarray(grads)[~mask].any() and np.asarray(grads)[mask].any()
    idx = jnp.asarray(mask_to_indices(mask))
    gathered = P.data2vec_loss(P.gather_positions(pred, idx), P.gather_positions(tgt, idx), jnp.ones(idx.shape))
    assert float(gathered[0]) == pytest.approx(float(base), rel=1e-6)


def test_no_gradient_reaches_the_teacher():
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
    mask = np.ones((2, 6), bool)
    mask[:, ::2] = False

    def loss_fn(student_x, teacher_x, wrap):
        teacher_x = jax.lax.stop_gradient(teacher_x) if wrap else teacher_x
        layers = [jnp.tanh(teacher_x @ w[i]) for i in range(3)]
        target = P.make_targets(layers, 2, "instance")
        return P.data2vec_loss(student_x @ w[0], target, mask)[0]

    for wrap in (True, False):  # data2vec_loss stops the gradient itself as well
        g_student, g_teacher = jax.grad(loss_fn, argnums=(0, 1))(x, x, wrap)
        assert not np.asarray(g_teacher).any()
        assert np.asarray(g_student).any()


def test_collapse_guard():
    a = P.Data2VecPretrainConfig.audio()
    assert P.check_collapse(0.05, 0.5, 5000, a) is None  # fairseq checks "num_updates > 5000"
    assert "target var" in P.check_collapse(0.05, 0.5, 5001, a)
    assert "pred var" in P.check_collapse(0.5, 0.001, 6000, a)
    assert P.check_collapse(0.5, 0.5, 6000, a) is None
    assert P.check_collapse(0.0, 0.0, 10**6, P.Data2VecPretrainConfig.text()) is None
