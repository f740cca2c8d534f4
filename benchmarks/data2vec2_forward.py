"""Forward latency: data2vec 2.0 encoders vs the v1 encoders of the same size, both flax under `jax.jit`.

    python -m benchmarks.data2vec2_forward              # CPU, float32, base shapes (audio 1 x 4 s, text 4 x 128)
    python -m benchmarks.data2vec2_forward --quick      # tiny shapes, smoke test
    python -m benchmarks.data2vec2_forward --device gpu # + bf16

Random-init base models (12 x 768). The 2.0 audio model adds the ALiBi bias to every attention call and drops
v1's positional-conv LayerNorm; the text models differ only in the fused qkv projection and token types.
Target: 2.0 within 20 % of v1 (speedup_vs_baseline >= 0.83).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from flax_data2vec import registry
from flax_data2vec.config import Data2VecAudioConfig, Data2VecTextConfig
from flax_data2vec.data2vec2_config import Data2Vec2AudioConfig, Data2Vec2TextConfig

TINY = dict(depth=2, embed_dim=64, num_heads=4)


def _configs(text: bool, quick: bool):
    if text:
        v1 = Data2VecTextConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=1, layer_norm_eps=1e-5)
        v2 = Data2Vec2TextConfig()
        if quick:
            v1 = v1.replace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
            v2 = Data2Vec2TextConfig(**TINY)
        return v1, v2
    v1, v2 = Data2VecAudioConfig(mask_time_prob=0.0), Data2Vec2AudioConfig()
    if quick:
        v1 = v1.replace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                        num_conv_pos_embedding_groups=4)
        v2 = Data2Vec2AudioConfig(**TINY, conv_pos_groups=4)
    return v1, v2


def _forward(name: str, config, inputs, dtype, attention):
    module = registry.model_class(name)(config, dtype=dtype, attention_implementation=attention)
    params = jax.jit(lambda k: registry.init_params(module, k))(jax.random.PRNGKey(0))
    fwd = jax.jit(lambda p, x: module.apply({"params": p}, x).last_hidden_state)
    compiled, compile_s = common.compile_jit(fwd, params, inputs)
    return (lambda: common.jax_sync(compiled(params, inputs))), compile_s, common.xla_flops(compiled)


def bench(args, text: bool, rows: list) -> None:
    v1, v2 = _configs(text, args.quick)
    if text:
        batch, length = (2, 16) if args.quick else (4, 128)
        rng = np.random.default_rng(0)
        inputs = jnp.asarray(rng.integers(3, v2.vocab_size, (batch, length)), jnp.int32)
        names, workload, work, unit = ("Data2VecTextModel", "Data2Vec2TextModel"), f"text fwd {batch}x{length}", \
            batch * length, "tok"
    else:
        seconds = 1.0 if args.quick else 4.0
        inputs = jnp.asarray(np.random.default_rng(0).standard_normal((1, int(16000 * seconds))), jnp.float32)
        names, workload, work, unit = ("Data2VecAudioModel", "Data2Vec2AudioModel"), f"audio fwd 1x{seconds:g}s", \
            seconds, "audio-s"
    variants = [("float32", jnp.float32, None)]
    if args.device == "gpu":
        variants += [("bfloat16", jnp.bfloat16, None)]  # cuDNN with the ALiBi bias: not yet measured
    for dtype_name, dtype, attention in variants:
        wl = f"{workload} {dtype_name} {attention or 'xla'} attention"
        fns, compile_s, flops = {}, {}, {}
        for name, config in zip(names, (v1, v2)):
            fns[name], compile_s[name], flops[name] = _forward(name, config, inputs, dtype, attention)
            print(f"[{wl}] {name}: compile {compile_s[name]:.1f}s", flush=True)
        timings = common.time_interleaved(fns, args.warmup, args.repeats, compile_s)
        for name, timing in timings.items():
            rows.append(common.Row(wl, name, timing, work=work, unit=unit,
                                   baseline=None if name == names[0] else names[0], flops=flops[name]))


def main(argv=None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    info = common.setup(args)
    rows: list[common.Row] = []
    if args.only in (None, "audio"):
        bench(args, False, rows)
    if args.only in (None, "text"):
        bench(args, True, rows)
    common.report(rows, info, args)


if __name__ == "__main__":
    sys.exit(main())
