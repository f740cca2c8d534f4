"""Where the flax text MLM training step spends its time (CPU or GPU), piece by piece.

    python -m benchmarks.breakdown [--quick] [--repeats 5] [--json out.json]

Each piece is its own jitted program on the base text config at 8 x 128 (CPU) / 32 x 512 (GPU):
forward only (eval), forward with dropout, forward + backward (full head / masked-only head),
the AdamW update alone, the dropout random bits alone, and the matmul shapes of one layer in
jax vs torch. Compare the sums with train_step.py's full step.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import common, models, pieces
from benchmarks.train_step import adamw, mlm_batch
from flax_data2vec.registry import from_transformers


def main(argv=None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    info = common.setup(args)
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
        return pieces.masked_mlm_loss(module, p, ids, positions, targets, rng)

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
        t = common.time_interleaved({"torch": lambda: ta @ tb, "jax": lambda: common.jax_sync(mm(ja, jb))},
                                    args.warmup, args.repeats, verbose=False)
        for n_, tt in t.items():
            rows.append(common.Row(f"matmul {m}x{k}x{n} fp32", n_, tt, baseline=None if n_ == "torch" else "torch",
                                   flops=2.0 * m * k * n))
    common.report(rows, info, args)


if __name__ == "__main__":
    sys.exit(main())
