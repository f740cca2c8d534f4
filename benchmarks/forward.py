"""Forward latency: transformers PyTorch eager (SDPA) vs flax_data2vec under `jax.jit`, same process.

    python -m benchmarks.forward                      # CPU, float32, base shapes (audio 1 x 10 s, text 8 x 128)
    python -m benchmarks.forward --quick              # tiny shapes, smoke test
    python -m benchmarks.forward --device gpu         # + bf16, + cuDNN attention (audio frames padded to 128k)

Random-init models with the published base shapes; flax params are converted from the torch model, so the
two compute the same function (the max |difference| of the outputs is printed as a check).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import common, models
from flax_data2vec.audio import FeatureEncoder
from flax_data2vec.registry import from_transformers


def _torch_forward(model, inputs: dict, device: str, bf16: bool):
    def run():
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            out = model(**inputs)
        common.torch_sync(device)
        return out
    return run


def _flax_forward(module, params, args: tuple, text: bool):
    """Jitted forward returning the same tensors the torch model computes (last hidden [+ pooler])."""
    def fwd(p, *a):
        out = module.apply({"params": p}, *a)
        return (out.last_hidden_state, out.pooler_output) if text else out.last_hidden_state
    compiled, compile_s = common.compile_jit(jax.jit(fwd), params, *args)
    flops = common.xla_flops(compiled)
    return (lambda: common.jax_sync(compiled(params, *args))), compiled, compile_s, flops


def bench_text(args, device: str, rows: list, extra: dict) -> None:
    batch, length = (2, 16) if args.quick else (8, 128)
    cfg = models.text_config(args.quick)
    tdev = "cuda" if device == "gpu" else "cpu"
    tmodel = models.torch_model("Data2VecTextModel", cfg, tdev)
    ids = models.token_ids(batch, length, cfg.vocab_size)
    t_in = {"input_ids": torch.from_numpy(ids).to(tdev)}
    j_ids = jnp.asarray(ids, jnp.int32)
    workload = f"text Data2VecTextModel fwd {batch}x{length}"
    variants = [("float32", False, None)]
    if device == "gpu":
        variants += [("bfloat16", True, None), ("bfloat16", True, "cudnn")]
    for dtype_name, bf16, attn in variants:
        wl = f"{workload} {dtype_name}"
        fns, compile_s = {}, {}
        torch_name = f"torch eager sdpa{' +autocast' if bf16 else ''}"
        if attn is None:  # the torch run is the same for both flax attention implementations
            fns[torch_name] = _torch_forward(tmodel, t_in, tdev, bf16)
        module, params = from_transformers(tmodel, dtype=jnp.bfloat16 if bf16 else jnp.float32,
                                           attention_implementation=attn)
        name = f"flax jit {attn or 'xla'} attention"
        fns[name], compiled, compile_s[name], flops = _flax_forward(module, params, (j_ids,), text=True)
        if not bf16:  # numerical check against torch
            with torch.inference_mode():
                ref = tmodel(**t_in).last_hidden_state.float().cpu().numpy()
            extra[f"{wl}: max |flax - torch| last_hidden_state"] = float(
                np.abs(np.asarray(compiled(params, j_ids)[0]) - ref).max())
        print(f"[{wl}] compile {compile_s[name]:.1f}s", flush=True)
        timings = common.time_interleaved(fns, args.warmup, args.repeats, compile_s)
        baseline = f"torch eager sdpa{' +autocast' if bf16 else ''}"
        for n, t in timings.items():
            rows.append(common.Row(wl, n, t, work=batch * length, unit="tok",
                                   baseline=None if n.startswith("torch") else baseline,
                                   flops=flops if n.startswith("flax") else None))
        del params


def bench_audio(args, device: str, rows: list, extra: dict) -> None:
    batch, seconds = (1, 1.0) if args.quick else (1, 10.0)
    cfg = models.audio_config(args.quick)
    tdev = "cuda" if device == "gpu" else "cpu"
    tmodel = models.torch_model("Data2VecAudioModel", cfg, tdev)
    wave = models.waveform(batch, seconds)
    frames = models.frames_for(cfg, wave.shape[1])
    padded_frames = -(-frames // models.CUDNN_BLOCK) * models.CUDNN_BLOCK
    t_in = {"input_values": torch.from_numpy(wave).to(tdev)}
    j_wave = jnp.asarray(wave)
    workload = f"audio Data2VecAudioModel fwd {batch}x{seconds:g}s ({frames} frames)"

    # (dtype, bf16, attention implementation, frame-axis multiple inside the encoder)
    variants = [("float32", False, None, 1), ("float32", False, None, 128)]
    if device == "gpu":  # cuDNN flash attention refuses T=499: it needs the padded frame axis
        variants += [("bfloat16", True, None, 1), ("bfloat16", True, "cudnn", 128)]
    unpadded_out = {}
    for dtype_name, bf16, attn, multiple in variants:
        wl = f"{workload} {dtype_name}"
        fns, compile_s = {}, {}
        torch_name = f"torch eager sdpa{' +autocast' if bf16 else ''}"
        if multiple == 1:
            fns[torch_name] = _torch_forward(tmodel, t_in, tdev, bf16)
        module, params = from_transformers(tmodel, dtype=jnp.bfloat16 if bf16 else jnp.float32,
                                           attention_implementation=attn, frame_multiple=multiple)
        name = f"flax jit {attn or 'xla'} attention" + (f", frames padded to {padded_frames}" if multiple > 1 else "")
        fns[name], compiled, compile_s[name], flops = _flax_forward(module, params, (j_wave,), text=False)
        out = np.asarray(compiled(params, j_wave), np.float32)
        if multiple == 1:
            unpadded_out[dtype_name] = out
            if not bf16:
                with torch.inference_mode():
                    ref = tmodel(**t_in).last_hidden_state.float().cpu().numpy()
                extra[f"{wl}: max |flax - torch| last_hidden_state"] = float(np.abs(out - ref).max())
                if args.quick or device == "gpu":
                    extra[f"{wl}: max |zero-padded audio + attention_mask - unpadded| on real frames"] = \
                        _padded_audio_error(module, params, wave, cfg, out)
        elif dtype_name in unpadded_out:
            extra[f"{wl}: max |{name} - package model| on real frames"] = float(
                np.abs(out - unpadded_out[dtype_name]).max())
        print(f"[{wl}] {name}: compile {compile_s[name]:.1f}s", flush=True)
        timings = common.time_interleaved(fns, args.warmup, args.repeats, compile_s)
        for n, t in timings.items():
            rows.append(common.Row(wl, n, t, work=batch * seconds, unit="audio-s",
                                   baseline=None if n.startswith("torch") else torch_name,
                                   flops=flops if n.startswith("flax") else None))
        del params
    _bench_feature_encoder(args, tmodel, t_in, j_wave, tdev, f"audio feature encoder only (7 convs) fwd "
                           f"{batch}x{seconds:g}s float32", batch * seconds, rows)


def _bench_feature_encoder(args, tmodel, t_in, j_wave, tdev, wl, work, rows) -> None:
    """The conv front end alone: a third of the FLOPs, and the part that maps worst onto matmul units."""
    module, params = from_transformers(tmodel)
    enc = FeatureEncoder(module.config)
    fe = jax.jit(lambda p, x: enc.apply({"params": p}, x))
    compiled, cs = common.compile_jit(fe, params["feature_extractor"], j_wave)
    name = "flax jit"
    fns = {"torch eager": lambda: (tmodel.feature_extractor(t_in["input_values"]), common.torch_sync(tdev)),
           name: lambda: common.jax_sync(compiled(params["feature_extractor"], j_wave))}
    with torch.inference_mode():
        timings = common.time_interleaved(fns, args.warmup, args.repeats, {name: cs})
    for n, t in timings.items():
        rows.append(common.Row(wl, n, t, work=work, unit="audio-s", baseline=None if n == "torch eager" else
                               "torch eager", flops=common.xla_flops(compiled) if n == name else None))


def _padded_audio_error(module, params, wave, cfg, unpadded_out) -> float:
    """The naive route: zero-pad the waveform so frames are a multiple of 128 and pass an attention mask.
    Not equal on real frames: the positional convs carry the padded frames into the last real ones."""
    pad_wave, pad_mask, real = models.pad_audio_to_frame_multiple(wave, cfg)
    out = jax.jit(lambda p, x, m: module.apply({"params": p}, x, m).last_hidden_state)(
        params, jnp.asarray(pad_wave), jnp.asarray(pad_mask))
    return float(np.abs(np.asarray(out, np.float32)[:, :real] - unpadded_out).max())


def main(argv=None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    info = common.setup(args)
    rows: list[common.Row] = []
    extra: dict = {}
    if not args.quick:
        extra["float32 matmul 2048^3 GFLOP/s"] = {k: round(v, 1) for k, v in common.matmul_peak(args.device).items()}
    if args.only in (None, "audio"):
        bench_audio(args, args.device, rows, extra)
    if args.only in (None, "text"):
        bench_text(args, args.device, rows, extra)
    common.report(rows, info, args, extra)


if __name__ == "__main__":
    sys.exit(main())
