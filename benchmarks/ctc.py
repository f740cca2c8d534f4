"""The CTC loss alone, forward + backward: torch's `F.ctc_loss` vs `optax.ctc_loss` vs `ctc_nll_unrolled`.

    python -m benchmarks.ctc                  # CPU, 8 x 749 frames x 32 symbols, 150 labels per row
    python -m benchmarks.ctc --device gpu     # the shape of the audio-base 8 x 15 s CTC step (REFERENCE.md §7)
    python -m benchmarks.ctc --quick          # tiny shapes, smoke test

optax's CTC runs one `lax.scan` iteration per frame, forward and backward; REFERENCE.md §7 measured it at
~20 ms of a 45 ms audio step on an H100. `flax_data2vec.ctc.ctc_nll_unrolled` unrolls `unroll` frames per
loop iteration; this script decides whether it should become the default on an accelerator. All variants
compute the same loss (the max difference to optax is printed).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import common
from flax_data2vec.ctc import ctc_loss


def main(argv=None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    info = common.setup(args)
    gpu = args.device == "gpu"
    tdev = "cuda" if gpu else "cpu"
    batch, frames, vocab, n_labels = (2, 50, 8, 10) if args.quick else (8, 749, 32, 150)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((batch, frames, vocab)).astype(np.float32)
    labels = rng.integers(1, vocab, (batch, n_labels)).astype(np.int32)
    lengths = np.full((batch,), frames, np.int32)
    j_logits, j_labels, j_lengths = jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(lengths)

    fns, compile_s, values = {}, {}, {}
    variants = [("optax.ctc_loss", "optax", 1)] + [(f"ctc_nll_unrolled, unroll {u}", "unrolled", u)
                                                    for u in (1, 4, 8, 16)]
    for name, impl, unroll in variants:
        fn = jax.jit(jax.value_and_grad(lambda x, impl=impl, unroll=unroll: ctc_loss(
            x, j_lengths, j_labels, 0, "sum", implementation=impl, unroll=unroll)))
        compiled, compile_s[name] = common.compile_jit(fn, j_logits)
        values[name] = compiled(j_logits)
        fns[name] = lambda compiled=compiled: common.jax_sync(compiled(j_logits))
        print(f"[{name}] compile {compile_s[name]:.1f}s", flush=True)

    t_logits = torch.tensor(logits, device=tdev, requires_grad=True)
    t_labels, t_lengths = torch.tensor(labels, device=tdev).long(), torch.tensor(lengths, device=tdev).long()
    t_label_lengths = torch.full((batch,), n_labels, device=tdev, dtype=torch.long)

    def torch_step():
        t_logits.grad = None
        logp = torch.log_softmax(t_logits, -1).transpose(0, 1)
        torch.nn.functional.ctc_loss(logp, t_labels, t_lengths, t_label_lengths, blank=0,
                                     reduction="sum").backward()
        common.torch_sync(tdev)

    fns["torch F.ctc_loss"] = torch_step
    timings = common.time_interleaved(fns, args.warmup, args.repeats, compile_s)
    wl = f"CTC loss fwd+bwd {batch}x{frames}x{vocab}, {n_labels} labels, fp32"
    rows = [common.Row(wl, n, t, baseline="optax.ctc_loss" if n != "optax.ctc_loss" else None)
            for n, t in timings.items()]
    ref_loss, ref_grad = values["optax.ctc_loss"]
    extra = {f"{n}: |loss - optax|, max |grad - optax|": (float(abs(v[0] - ref_loss)),
                                                         float(jnp.abs(v[1] - ref_grad).max()))
             for n, v in values.items() if n != "optax.ctc_loss"}
    common.report(rows, info, args, extra)


if __name__ == "__main__":
    sys.exit(main())
