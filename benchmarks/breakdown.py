"""Where the flax training steps spend their time (CPU or GPU), piece by piece.

    python -m benchmarks.breakdown [--only text|audio] [--quick] [--repeats 5] [--json out.json]

Each piece is its own jitted program on the base text config at 8 x 128 (CPU) / 32 x 512 (GPU):
forward only (eval), forward with dropout, forward + backward (full head / masked-only head),
the AdamW update alone, the dropout random bits alone, and the matmul shapes of one layer in
jax vs torch. Audio (CTC, 2 x 5 s on CPU): forward+backward without the optimizer, and the positional convs
and the CTC loss alone, each against torch. Compare the sums with train_step.py's full step.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import common, models
from benchmarks.train_step import adamw, mlm_batch
from flax_data2vec.audio import PositionalConvEmbedding
from flax_data2vec.ctc import ctc_loss
from flax_data2vec.registry import from_transformers


def main(argv=None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    info = common.setup(args)
    rows: list[common.Row] = []
    if args.only in (None, "text"):
        rows += text_pieces(args)
    if args.only in (None, "audio"):
        rows += audio_pieces(args)
    common.report(rows, info, args)


def text_pieces(args) -> list:
    gpu = args.device == "gpu"
    batch, length = (2, 16) if args.quick else ((32, 512) if gpu else (8, 128))
    cfg = models.text_config(args.quick)
    tmodel = models.torch_model("Data2VecTextForMaskedLM", cfg, "cpu")
    module, params = from_transformers(tmodel, dtype=jnp.bfloat16 if gpu else jnp.float32)
    del tmodel
    inputs, labels, positions, targets = mlm_batch(batch, length, cfg.vocab_size, cfg.vocab_size - 1)
    ids, labels = jnp.asarray(inputs, jnp.int32), jnp.asarray(labels, jnp.int32)
    positions, targets = jnp.asarray(positions, jnp.int32), jnp.asarray(targets, jnp.int32)
    rng = jax.random.PRNGKey(0)

    def loss_full(p, det):
        return module.apply({"params": p}, ids, labels=labels, deterministic=det, rngs={"dropout": rng}).loss

    def loss_masked(p):
        return models.masked_mlm_loss(module, p, ids, positions, targets, rng)

    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    tx = adamw()
    opt_state = jax.jit(tx.init)(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)

    def adam_update(p, s, g):
        updates, s = tx.update(g, s, p)
        return jax.tree_util.tree_map(lambda a, b: a + b, p, updates), s

    # all dropout masks of one step: 3 per layer (attention probs, attention out, FFN out) + embeddings
    h, heads, n_layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    drop_elems = n_layers * (batch * heads * length * length + 2 * batch * length * h) + batch * length * h

    programs = {
        "forward, eval (no dropout)": (jax.jit(lambda p: loss_full(p, True)), (params,)),
        "forward, train (dropout)": (jax.jit(lambda p: loss_full(p, False)), (params,)),
        "forward+backward, full head": (jax.jit(jax.grad(lambda p: loss_full(p, False))), (params,)),
        "forward+backward, masked-only head": (jax.jit(jax.grad(loss_masked)), (params,)),
        f"AdamW update alone ({n_params / 1e6:.0f}M params)": (jax.jit(adam_update), (params, opt_state, grads)),
        f"dropout bits alone ({drop_elems / 1e6:.0f}M bernoulli)": (
            jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (drop_elems,))), (rng,)),
    }
    fns, compile_s, flops = {}, {}, {}
    for name, (fn, a) in programs.items():
        compiled, compile_s[name] = common.compile_jit(fn, *a)
        flops[name] = common.xla_flops(compiled)
        fns[name] = lambda compiled=compiled, a=a: common.jax_sync(compiled(*a))
        print(f"[{name}] compile {compile_s[name]:.1f}s", flush=True)
    timings = common.time_interleaved(fns, args.warmup, args.repeats, compile_s)
    wl = f"flax text MLM pieces {batch}x{length}"
    rows = [common.Row(wl, n, t, work=batch * length, unit="tok", flops=flops[n]) for n, t in timings.items()]

    # the dense shapes of one layer: jax (XLA CPU dot) vs torch (MKL/oneDNN sgemm)
    tokens = batch * length
    rs = np.random.default_rng(0)
    for m, k, n in ((tokens, h, 3 * h), (tokens, h, 4 * h), (tokens, 4 * h, h), (tokens, h, cfg.vocab_size)):
        a, b = rs.standard_normal((m, k), np.float32), rs.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        mm = jax.jit(jnp.matmul)
        t = common.time_interleaved({"torch": lambda ta=ta, tb=tb: ta @ tb,
                                     "jax": lambda mm=mm, ja=ja, jb=jb: common.jax_sync(mm(ja, jb))},
                                    args.warmup, args.repeats, verbose=False)
        for n_, tt in t.items():
            rows.append(common.Row(f"matmul {m}x{k}x{n} fp32", n_, tt, baseline=None if n_ == "torch" else "torch",
                                   flops=2.0 * m * k * n))
    return rows


def audio_pieces(args) -> list:
    """Data2VecAudioForCTC training (feature encoder frozen) in pieces, torch vs flax where both exist."""
    gpu = args.device == "gpu"
    tdev = "cuda" if gpu else "cpu"
    batch, seconds = (2, 1.0) if args.quick else ((8, 15.0) if gpu else (2, 5.0))
    cfg = models.audio_config(args.quick, layerdrop=0.0)
    tmodel = models.torch_model("Data2VecAudioForCTC", cfg, tdev).train()
    tmodel.freeze_feature_encoder()
    module, params = from_transformers(tmodel, freeze_feature_encoder=True)
    wave = models.waveform(batch, seconds)
    frames = models.frames_for(cfg, wave.shape[1])
    labels = np.random.default_rng(1).integers(1, cfg.vocab_size, (batch, max(2, frames // 5)))
    jw, jl = jnp.asarray(wave), jnp.asarray(labels, jnp.int32)
    tw, tl = torch.from_numpy(wave).to(tdev), torch.from_numpy(labels).to(tdev)
    rng = jax.random.PRNGKey(0)
    h = cfg.hidden_size
    x = np.random.default_rng(2).standard_normal((batch, frames, h)).astype(np.float32)
    logits = np.random.default_rng(3).standard_normal((batch, frames, cfg.vocab_size)).astype(np.float32)

    def loss(p, w, lab, det):  # inputs as arguments: closed-over labels trip audio_heads._check_labels in jit
        return module.apply({"params": p}, w, labels=lab, deterministic=det, rngs={"dropout": rng}).loss

    pos = PositionalConvEmbedding(module.config)
    pos_params = params["data2vec_audio"]["encoder"]["pos_conv_embed"]
    ctc_len = jnp.full((batch,), frames)
    pieces_ = {  # name: (jax fn, jax args, torch fn or None)
        "fwd+bwd (no optimizer), train mode": (
            jax.grad(lambda p, w, lab: loss(p, w, lab, False)), (params, jw, jl),
            lambda: (tmodel.zero_grad(set_to_none=True), tmodel(input_values=tw, labels=tl).loss.backward())),
        "fwd+bwd, eval mode (no dropout / SpecAugment)": (
            jax.grad(lambda p, w, lab: loss(p, w, lab, True)), (params, jw, jl), None),
        f"positional convs fwd+bwd ({batch}x{frames}x{h})": (
            jax.grad(lambda p, v: jnp.sum(pos.apply({"params": p}, v) ** 2), argnums=(0, 1)),
            (pos_params, jnp.asarray(x)), _torch_grad(tmodel.data2vec_audio.encoder.pos_conv_embed, x, tdev)),
        f"positional convs fwd only ({batch}x{frames}x{h})": (
            lambda p, v: pos.apply({"params": p}, v), (pos_params, jnp.asarray(x)),
            _torch_fwd(tmodel.data2vec_audio.encoder.pos_conv_embed, x, tdev)),
        f"CTC loss fwd+bwd ({batch}x{frames}x{cfg.vocab_size})": (
            jax.grad(lambda lg, lab: ctc_loss(lg, ctc_len, lab, cfg.pad_token_id, "sum")), (jnp.asarray(logits), jl),
            _torch_ctc(logits, labels, tdev)),
    }
    rows = []
    for name, (fn, a, tfn) in pieces_.items():
        compiled, cs = common.compile_jit(jax.jit(fn), *a)
        fns = {"flax jit": lambda compiled=compiled, a=a: common.jax_sync(compiled(*a))}
        if tfn is not None:
            fns["torch eager"] = lambda tfn=tfn: (tfn(), common.torch_sync(tdev))
        print(f"[{name}] compile {cs:.1f}s", flush=True)
        t = common.time_interleaved(fns, args.warmup, args.repeats, {"flax jit": cs})
        wl = f"audio CTC train pieces {batch}x{seconds:g}s: {name}"
        for n, tt in t.items():
            rows.append(common.Row(wl, n, tt, baseline="torch eager" if n != "torch eager" and tfn else None))
    return rows


def _torch_grad(mod, x, tdev):
    xt = torch.from_numpy(x).to(tdev).requires_grad_(True)
    return lambda: (mod.zero_grad(set_to_none=True), mod(xt).pow(2).sum().backward())


def _torch_fwd(mod, x, tdev):
    xt = torch.from_numpy(x).to(tdev)

    def run():
        with torch.inference_mode():
            return mod(xt)
    return run


def _torch_ctc(logits, labels, tdev):
    lg = torch.from_numpy(logits).to(tdev).requires_grad_(True)
    tl = torch.from_numpy(labels).to(tdev)
    in_len = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
    tgt_len = torch.full((labels.shape[0],), labels.shape[1], dtype=torch.long)

    def run():
        lp = torch.log_softmax(lg, -1).transpose(0, 1)
        torch.nn.functional.ctc_loss(lp, tl, in_len, tgt_len, blank=0, reduction="sum").backward()
    return run


if __name__ == "__main__":
    sys.exit(main())
