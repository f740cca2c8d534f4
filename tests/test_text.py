"""Data2Vec text models vs transformers' PyTorch classes (float32, max abs diff <= 1e-4).

Tiny random models are built from configs (no downloads); every parameter is perturbed so LayerNorm
scales, biases and the LM bias are non-trivial. Inputs are right padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax_data2vec import (
    losses,  # noqa: E402
    registry,  # noqa: E402
)
from flax_data2vec.config import Data2VecTextConfig  # noqa: E402
from flax_data2vec.text import init_cache, position_ids_from_input_ids  # noqa: E402
from flax_data2vec.weights import text_weight_table  # noqa: E402

TEXT_MODELS = {n: c for n, c in registry.model_classes().items() if n.startswith("Data2VecText")}
from conftest import TOL, assert_close  # noqa: E402

from flax_data2vec.weights import from_state_dict, scan_params, to_state_dict  # noqa: E402

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-5)
B, T, PAD = 3, 9, 1
LENGTHS = (T, T - 3, T - 1)  # right padding on rows 1 and 2


# ---------------------------------------------------------------------------------------------------------------
# helpers
@functools.cache
def make_pair(class_name: str, **overrides):
    """(torch model in eval mode, flax module, flax params converted from the torch state dict)."""
    kw = {**SMALL, **overrides}
    tcfg = transformers.Data2VecTextConfig(**kw, attn_implementation="eager")
    torch.manual_seed(0)
    tmodel = getattr(transformers, class_name)(tcfg).eval()
    with torch.no_grad():
        for p in tmodel.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = Data2VecTextConfig.from_dict(tcfg.to_dict())
    fmodel = TEXT_MODELS[class_name](config)
    params = convert(tmodel, fmodel, class_name, config)
    return tmodel, fmodel, params


def convert(tmodel, fmodel, class_name, config):
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    table = text_weight_table(class_name, config.tie_word_embeddings)
    params, report = from_state_dict(sd, registry.abstract_params(fmodel), table)
    assert report.missing == [] and report.unexpected == [], report
    return jax.tree_util.tree_map(jnp.asarray, params)


def make_inputs(seed=0, batch=B, length=T, lengths=LENGTHS, vocab=99, type_ids=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, length)).astype(np.int64)
    mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, PAD)
    tt = (np.arange(length)[None] >= length // 2).astype(np.int64).repeat(batch, 0) if type_ids else None
    return ids, mask, tt


def t(x):
    return None if x is None else torch.from_numpy(np.asarray(x))


def run_both(class_name, overrides, inputs, flax_kw=None, torch_kw=None):
    tmodel, fmodel, params = make_pair(class_name, **overrides)
    ids, mask, tt = inputs
    flax_kw, torch_kw = flax_kw or {}, torch_kw or {}
    with torch.no_grad():
        tout = tmodel(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(tt), output_attentions=True,
                      output_hidden_states=True, **{k: t(v) for k, v in torch_kw.items()})
    fout = fmodel.apply({"params": params}, jnp.asarray(ids), None if mask is None else jnp.asarray(mask),
                        None if tt is None else jnp.asarray(tt), output_attentions=True, output_hidden_states=True,
                        **flax_kw)
    return tout, fout


FIELDS = ("last_hidden_state", "pooler_output", "logits", "loss", "start_logits", "end_logits", "hidden_states",
          "attentions", "cross_attentions")


def compare_outputs(tout, fout):
    checked = 0
    for field in FIELDS:
        if field in tout:  # transformers' ModelOutput: keys are the non-None fields
            assert_close(field, getattr(fout, field), tout[field])
            checked += 1
    assert checked >= 3


# ---------------------------------------------------------------------------------------------------------------
# parity with transformers
DECODER = dict(is_decoder=True)
CROSS = dict(is_decoder=True, add_cross_attention=True)


def _encoder_states(seed=1, batch=B, length=5):
    rng = np.random.default_rng(seed)
    states = rng.standard_normal((batch, length, SMALL["hidden_size"])).astype(np.float32)
    mask = (np.arange(length)[None] < np.array([5, 3, 4])[:batch, None]).astype(np.int64)
    return dict(encoder_hidden_states=states, encoder_attention_mask=mask)


def _lm_labels(ids, mask, seed=2):
    labels = np.random.default_rng(seed).integers(0, 99, ids.shape)
    return np.where(mask == 1, labels, -100)


@pytest.mark.parametrize("overrides,extra", [
    ({}, None), (dict(type_vocab_size=1), None), ({}, "positions"), (DECODER, None), (CROSS, "cross")],
    ids=["encoder", "type_vocab_1", "explicit_positions", "decoder", "cross"])
def test_base_model_matches_torch(overrides, extra):
    inputs = make_inputs(type_ids=overrides.get("type_vocab_size", 2) == 2)
    kw = {}
    if extra == "cross":
        kw = _encoder_states()
    elif extra == "positions":
        kw = dict(position_ids=np.random.default_rng(5).integers(0, SMALL["max_position_embeddings"], (B, T)))
    tout, fout = run_both("Data2VecTextModel", overrides, inputs, flax_kw=kw, torch_kw=kw)
    compare_outputs(tout, fout)
    if extra == "cross":
        assert fout.cross_attentions is not None and len(fout.cross_attentions) == SMALL["num_hidden_layers"]


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=False)], ids=["tied", "untied"])
def test_masked_lm_matches_torch(overrides):
    ids, mask, tt = make_inputs()
    labels = _lm_labels(ids, mask)
    tout, fout = run_both("Data2VecTextForMaskedLM", overrides, (ids, mask, tt), dict(labels=labels),
                          dict(labels=labels))
    compare_outputs(tout, fout)


@pytest.mark.parametrize("overrides,cross", [(DECODER, False), (CROSS, True)], ids=["decoder", "cross"])
def test_causal_lm_matches_torch(overrides, cross):
    ids, mask, tt = make_inputs()
    kw = dict(labels=_lm_labels(ids, mask), **(_encoder_states() if cross else {}))
    tout, fout = run_both("Data2VecTextForCausalLM", overrides, (ids, mask, tt), kw, kw)
    compare_outputs(tout, fout)


@pytest.mark.parametrize("num_labels,problem_type,kind", [
    (1, None, "float"), (3, None, "int"), (3, None, "multi"), (2, "regression", "multi"),
    (3, "single_label_classification", "int")])
def test_sequence_classification_matches_torch(num_labels, problem_type, kind):
    rng = np.random.default_rng(3)
    labels = {"float": rng.standard_normal(B).astype(np.float32),
              "int": rng.integers(0, num_labels, B),
              "multi": rng.integers(0, 2, (B, num_labels)).astype(np.float32)}[kind]
    overrides = dict(num_labels=num_labels, problem_type=problem_type)
    # the reference writes the inferred problem_type into its config on the first call: undo that
    make_pair("Data2VecTextForSequenceClassification", **overrides)[0].config.problem_type = problem_type
    tout, fout = run_both("Data2VecTextForSequenceClassification", overrides, make_inputs(), dict(labels=labels),
                          dict(labels=labels))
    compare_outputs(tout, fout)


def test_multiple_choice_matches_torch():
    ids, mask, tt = make_inputs(batch=4, lengths=(9, 6, 8, 4))
    ids, mask, tt = (x.reshape(2, 2, T) for x in (ids, mask, tt))
    labels = np.array([1, 0])
    tout, fout = run_both("Data2VecTextForMultipleChoice", {}, (ids, mask, tt), dict(labels=labels),
                          dict(labels=labels))
    compare_outputs(tout, fout)
    assert fout.logits.shape == (2, 2)


def test_token_classification_matches_torch():
    ids, mask, tt = make_inputs()
    labels = np.where(mask == 1, np.random.default_rng(4).integers(0, 5, ids.shape), -100)
    tout, fout = run_both("Data2VecTextForTokenClassification", dict(num_labels=5), (ids, mask, tt),
                          dict(labels=labels), dict(labels=labels))
    compare_outputs(tout, fout)


@pytest.mark.parametrize("start,end", [([0, 3, 5], [2, 4, 7]), ([1, 50, -3], [T, 2, 40])], ids=["inside", "outside"])
def test_question_answering_matches_torch(start, end):
    kw = dict(start_positions=np.array(start), end_positions=np.array(end))
    tout, fout = run_both("Data2VecTextForQuestionAnswering", {}, make_inputs(), kw, kw)
    compare_outputs(tout, fout)


# ---------------------------------------------------------------------------------------------------------------
# behaviour
def test_position_ids_follow_roberta():
    ids = jnp.array([[0, 5, 6, 2, 1, 1]])
    np.testing.assert_array_equal(position_ids_from_input_ids(ids, 1), [[2, 3, 4, 5, 1, 1]])
    np.testing.assert_array_equal(position_ids_from_input_ids(ids, 1, offset=3), [[5, 6, 7, 8, 1, 1]])


def test_padding_does_not_change_real_tokens():
    _, model, params = make_pair("Data2VecTextModel")
    ids, mask, tt = make_inputs()
    padded = model.apply({"params": params}, ids, mask, tt).last_hidden_state
    for row in (1,):
        n = LENGTHS[row]
        alone = model.apply({"params": params}, ids[row:row + 1, :n], mask[row:row + 1, :n],
                            tt[row:row + 1, :n]).last_hidden_state
        np.testing.assert_allclose(padded[row, :n], alone[0], atol=1e-5)


@pytest.mark.parametrize("class_name,overrides", [(name, {}) for name in TEXT_MODELS] + [
    ("Data2VecTextForMaskedLM", dict(tie_word_embeddings=False)), ("Data2VecTextForCausalLM", CROSS)])
def test_state_dict_round_trip(class_name, overrides):
    tmodel, fmodel, params = make_pair(class_name, **overrides)
    table = text_weight_table(class_name, overrides.get("tie_word_embeddings", True))
    sd = to_state_dict(params, table)
    ref = tmodel.state_dict()
    assert set(sd) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
    # flax-initialised weights load strictly into a fresh torch model, and ties survive the load
    fresh = getattr(transformers, class_name)(tmodel.config).eval()
    ids = np.full((1, 1, 4) if class_name.endswith("MultipleChoice") else (1, 4), 5, np.int32)
    init = fmodel.init(jax.random.PRNGKey(7), ids)["params"]  # cross-attention weights are made even without states
    fresh.load_state_dict({k: torch.tensor(v) for k, v in to_state_dict(init, table).items()}, strict=True)
    if class_name in ("Data2VecTextForMaskedLM", "Data2VecTextForCausalLM") and table.tied:
        embedding = fresh.data2vec_text.embeddings.word_embeddings.weight
        assert fresh.lm_head.decoder.weight.data_ptr() == embedding.data_ptr()
        assert fresh.lm_head.decoder.bias.data_ptr() == fresh.lm_head.bias.data_ptr()
    ids, mask, tt = make_inputs()
    if class_name.endswith("MultipleChoice"):
        ids, mask, tt = (x[:2].reshape(1, 2, T) for x in (ids, mask, tt))
    kw = {}
    if overrides.get("add_cross_attention"):
        kw = _encoder_states()
    with torch.no_grad():
        tout = fresh(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(tt), **{k: t(v) for k, v in kw.items()})
    fout = fmodel.apply({"params": init}, ids, mask, tt, **kw)
    key = "last_hidden_state" if class_name == "Data2VecTextModel" else (
        "start_logits" if class_name.endswith("QuestionAnswering") else "logits")
    assert_close(key, getattr(fout, key), tout[key])


def test_scan_and_remat_match_unrolled():
    _, model, params = make_pair("Data2VecTextForMaskedLM")
    ids, mask, tt = make_inputs()
    want = model.apply({"params": params}, ids, mask, tt, output_hidden_states=True, output_attentions=True)
    for options in (dict(scan_layers=True), dict(remat=True), dict(scan_layers=True, remat=True)):
        other = model.clone(**options)
        p = scan_params(params) if options.get("scan_layers") else params
        got = other.apply({"params": p}, ids, mask, tt, output_hidden_states=True, output_attentions=True)
        for field in ("logits", "hidden_states", "attentions"):
            assert_close(field, getattr(got, field), getattr(want, field), tol=1e-5)


def test_masked_lm_gradients_match_torch():
    tmodel, fmodel, params = make_pair("Data2VecTextForMaskedLM")
    ids, mask, tt = make_inputs()
    ids[0, 4] = PAD  # a pad id the mask lets through: torch gives its embedding rows (padding_idx) no gradient
    labels = _lm_labels(ids, mask)
    tmodel.zero_grad()
    tmodel(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(tt), labels=t(labels)).loss.backward()

    def loss_fn(p):
        return fmodel.apply({"params": p}, ids, mask, tt, labels=labels).loss

    grads = to_state_dict(jax.jit(jax.grad(loss_fn))(params), text_weight_table("Data2VecTextForMaskedLM"))
    for name, p in tmodel.named_parameters():  # tied parameters appear once, under their owner's name
        want = p.grad.numpy()
        np.testing.assert_allclose(grads[name], want, atol=1e-5, rtol=1e-4, err_msg=name)


def _decode(model, params, ids, cache, prefill=3, **kw):
    """Prefill `prefill` tokens, then one token per step; returns the logits of every position."""
    step = jax.jit(lambda c, x: model.apply({"params": params, "cache": c}, x, decode=True, mutable=["cache"], **kw))
    logits = []
    for lo, hi in [(0, prefill)] + [(i, i + 1) for i in range(prefill, ids.shape[1])]:
        out, mutated = step(cache, ids[:, lo:hi])
        cache = mutated["cache"]
        logits.append(out.logits)
    return jnp.concatenate(logits, axis=1)


@pytest.mark.parametrize("overrides,scan", [(DECODER, False), (CROSS, False), (CROSS, True)],
                         ids=["decoder", "cross", "cross-scan"])
def test_cached_decoding_matches_full_forward(overrides, scan):
    _, model, params = make_pair("Data2VecTextForCausalLM", **overrides)
    if scan:
        model, params = model.clone(scan_layers=True), scan_params(params)
    ids = jnp.asarray(make_inputs(lengths=(T,) * B)[0])
    kw = {}
    if overrides.get("add_cross_attention"):
        kw = {k: jnp.asarray(v) for k, v in _encoder_states().items()}
    full = model.apply({"params": params}, ids, **kw).logits
    cache = init_cache(model, B, T + 2, kw.get("encoder_hidden_states"))  # a cache longer than the text
    np.testing.assert_allclose(_decode(model, params, ids, cache, **kw), full, atol=1e-5)


def test_cached_decoding_with_left_padded_prompts_matches_torch():
    # Each step passes the mask of its own tokens (the model caches earlier masks). Positions count the
    # cached tokens, pads included, exactly as the reference's `cache_length` offset: so compare with
    # torch's own incremental decoding, not with a full forward pass.
    tmodel, model, params = make_pair("Data2VecTextForCausalLM", **DECODER)
    ids, _, _ = make_inputs(lengths=(T,) * B)
    mask = np.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, PAD
    cache = init_cache(model, B, T)
    step = jax.jit(lambda c, x, m: model.apply({"params": params, "cache": c}, x, m, decode=True, mutable=["cache"]))
    got, want, torch_cache = [], [], None
    for lo, hi in [(0, 4)] + [(i, i + 1) for i in range(4, T)]:
        out, mutated = step(cache, ids[:, lo:hi], mask[:, lo:hi])
        cache = mutated["cache"]
        got.append(out.logits)
        with torch.no_grad():
            tout = tmodel(input_ids=t(ids[:, lo:hi]), attention_mask=t(mask[:, :hi]), cache=torch_cache,
                          use_cache=True)
        torch_cache = tout.cache
        want.append(tout.logits.numpy())
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(got, axis=1)[real], np.concatenate(want, axis=1)[real], atol=TOL)


def _apply(model, params, *args, **kw):
    return model.apply({"params": params}, *args, **kw)


def test_every_module_jits():
    ids, mask, _ = make_inputs()
    labels = {"Data2VecTextForMaskedLM": dict(labels=_lm_labels(ids, mask)),
              "Data2VecTextForCausalLM": dict(labels=_lm_labels(ids, mask)),
              "Data2VecTextForSequenceClassification": dict(labels=np.array([0, 1, 1])),
              "Data2VecTextForMultipleChoice": dict(labels=np.array([0, 2, 1])),
              "Data2VecTextForTokenClassification": dict(labels=np.where(mask == 1, 1, -100)),
              "Data2VecTextForQuestionAnswering": dict(start_positions=np.array([0, 1, 2]),
                                                       end_positions=np.array([3, 4, 5]))}
    for name in TEXT_MODELS:
        _, model, params = make_pair(name, **(DECODER if name.endswith("CausalLM") else {}))
        x, m = (ids, mask)
        if name.endswith("MultipleChoice"):
            x, m = ids[:, None].repeat(3, 1), mask[:, None].repeat(3, 1)
        kw = labels.get(name, {})
        out = jax.jit(lambda p, x, m, kw, model=model: _apply(model, p, x, m, **kw))(params, x, m, kw)
        eager = _apply(model, params, x, m, **kw)
        for got, want in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(eager), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def test_dropout_is_active_only_in_training():
    # one head covers every dropout site: embeddings, attention probs, residual branches, classifier
    _, model, params = make_pair("Data2VecTextForSequenceClassification")
    ids, mask, _ = make_inputs()
    run = jax.jit(lambda rng, det: model.apply({"params": params}, ids, mask, deterministic=det,
                                               rngs={"dropout": rng}).logits, static_argnums=1)
    a, b = run(jax.random.PRNGKey(1), False), run(jax.random.PRNGKey(2), False)
    assert np.isfinite(a).all() and not np.allclose(a, b)
    np.testing.assert_array_equal(run(jax.random.PRNGKey(1), True), run(jax.random.PRNGKey(2), True))


def test_bfloat16_compute_is_close_to_float32():
    # bf16 keeps ~3 significant digits: measured max diffs are ~0.03 on O(1) hidden states and logits,
    # ~1e-3 on the loss; the bounds below leave a 3x margin.
    _, model, params = make_pair("Data2VecTextForMaskedLM")
    ids, mask, tt = make_inputs()
    labels = _lm_labels(ids, mask)
    ref = model.apply({"params": params}, ids, mask, tt, labels=labels)
    out = model.clone(dtype=jnp.bfloat16).apply({"params": params}, ids, mask, tt, labels=labels)
    assert out.logits.dtype == jnp.float32 and out.loss.dtype == jnp.float32
    assert np.max(np.abs(out.logits - ref.logits)) < 0.1
    assert abs(float(out.loss) - float(ref.loss)) < 1e-2
    _, base, base_params = make_pair("Data2VecTextModel")
    h32 = base.apply({"params": base_params}, ids, mask, tt).last_hidden_state
    h16 = base.clone(dtype=jnp.bfloat16).apply({"params": base_params}, ids, mask, tt).last_hidden_state
    assert h16.dtype == jnp.bfloat16 and np.max(np.abs(h16.astype(jnp.float32) - h32)) < 0.1
    half = model.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    half_params = half.init(jax.random.PRNGKey(0), ids)["params"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(half_params)} == {jnp.dtype(jnp.bfloat16)}


def test_losses_match_torch_conventions():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    assert np.isnan(losses.cross_entropy(logits, jnp.array([-100, -100])))  # torch: mean over nothing
    got = losses.causal_lm_loss(logits[None], jnp.array([[7, 2]]))  # only logit 0 -> label 2 is scored
    np.testing.assert_allclose(got, -jax.nn.log_softmax(logits[0])[2], rtol=1e-6)
    assert losses.infer_problem_type(1, np.int64) == "regression"
    assert losses.infer_problem_type(3, np.int32) == "single_label_classification"
    assert losses.infer_problem_type(3, np.float32) == "multi_label_classification"


# ---------------------------------------------------------------------------------------------------------------
# bad input
def test_bad_inputs_raise_clear_errors():
    _, model, params = make_pair("Data2VecTextModel")
    apply = functools.partial(model.apply, {"params": params})
    ids, mask, _ = make_inputs()
    max_len = model.config.max_sequence_length
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, seq\)"):
        apply(ids[0])
    with pytest.raises(TypeError, match="integer array of token ids"):
        apply(ids.astype(np.float32))
    with pytest.raises(ValueError, match=f"more than the {max_len}"):
        apply(np.full((1, max_len + 1), 5))
    apply(np.full((1, max_len), 5))  # the longest allowed input works
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 99\)"):
        apply(np.array([[5, 99]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        apply(ids, mask[:, :-1])
    with pytest.raises(ValueError, match="no cross-attention layers"):
        apply(ids, encoder_hidden_states=jnp.zeros((B, 2, 32)))
    with pytest.raises(ValueError, match="decode=True needs a causal model"):
        apply(ids, decode=True, mutable=["cache"])
    jax.jit(lambda x: apply(x).last_hidden_state)(ids)  # traced ids skip the value check

    _, mlm, mlm_params = make_pair("Data2VecTextForMaskedLM")
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 9\)"):
        mlm.apply({"params": mlm_params}, ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 99\) or be -100"):
        mlm.apply({"params": mlm_params}, ids, labels=np.full(ids.shape, 120))
    _, cls, cls_params = make_pair("Data2VecTextForSequenceClassification", num_labels=3)
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\) or \(3, 1\)"):
        cls.apply({"params": cls_params}, ids, labels=np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 3\)"):
        cls.apply({"params": cls_params}, ids, labels=np.zeros((3,), np.float32))
    _, mc, mc_params = make_pair("Data2VecTextForMultipleChoice")
    with pytest.raises(ValueError, match=r"\(batch, choices, seq\)"):
        mc.apply({"params": mc_params}, ids)
    with pytest.raises(ValueError, match="num_labels == 2"):
        TEXT_MODELS["Data2VecTextForQuestionAnswering"](model.config.replace(num_labels=3)).init(
            jax.random.PRNGKey(0), ids)


def test_masked_positions_head_gives_the_full_loss():
    """The LM head on the masked positions only = the full head with -100 elsewhere."""
    import flax_data2vec as fd
    config = fd.Data2VecTextConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=40)
    module = fd.Data2VecTextForMaskedLM(config)
    params = fd.init_params(module, 0)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, (3, 12)).astype(np.int32)
    positions = np.stack([rng.choice(12, 4, replace=False) for _ in range(3)]).astype(np.int32)
    targets = rng.integers(3, 99, (3, 4)).astype(np.int32)
    full_labels = np.full((3, 12), -100, np.int32)
    np.put_along_axis(full_labels, positions, targets, axis=1)
    full = module.apply({"params": params}, ids, labels=full_labels)
    part = module.apply({"params": params}, ids, labels=targets, masked_positions=positions)
    assert part.logits.shape == (3, 4, 99)
    np.testing.assert_allclose(float(part.loss), float(full.loss), rtol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(full.logits), positions[..., None], 1),
                               np.asarray(part.logits), atol=1e-5)


def test_output_positions_run_the_last_layer_on_those_rows_only():
    """`output_positions` gives the full output's rows there, with padding (the eval program computes the last
    layer on those rows alone: fewer FLOPs); bad positions get one clear error."""
    import flax_data2vec as fd
    config = fd.Data2VecTextConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=40)
    module = fd.Data2VecTextModel(config, add_pooling_layer=False)
    params = fd.init_params(module, 0)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:], ids[1, 8:] = 0, config.pad_token_id
    positions = np.array([[0, 5], [7, 1], [11, 11]], np.int32)
    full = module.apply({"params": params}, ids, mask).last_hidden_state
    run = jax.jit(lambda p, pos: module.apply({"params": p}, ids, mask, output_positions=pos).last_hidden_state)
    np.testing.assert_allclose(np.asarray(run(params, positions)),
                               np.take_along_axis(np.asarray(full), positions[..., None], 1), atol=1e-5)
    flops = lambda pos: jax.jit(lambda p: module.apply(  # noqa: E731
        {"params": p}, ids, mask, output_positions=pos).last_hidden_state).lower(params).compile().cost_analysis()
    first = lambda ca: (ca[0] if isinstance(ca, list) else ca)["flops"]  # noqa: E731
    assert first(flops(positions)) < first(flops(np.tile(np.arange(12, dtype=np.int32), (3, 1))))
    for bad, match in ((np.full((3, 1), 12, np.int32), r"lie in \[0, 12\)"), (np.zeros((2, 1), np.int32), "shape"),
                       (np.zeros((3, 1), np.float32), "integer")):
        with pytest.raises((ValueError, TypeError), match=match):
            module.apply({"params": params}, ids, mask, output_positions=bad)
    with pytest.raises(ValueError, match="add_pooling_layer"):
        fd.Data2VecTextModel(config).apply({"params": params}, ids, mask, output_positions=positions)
