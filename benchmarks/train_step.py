"""One full training step (forward, backward, AdamW update): transformers eager vs flax_data2vec jit.

    python -m benchmarks.train_step                   # CPU fp32: text MLM 8 x 128, audio CTC 2 x 5 s
    python -m benchmarks.train_step --quick           # tiny shapes, smoke test (also checks the losses agree)
    python -m benchmarks.train_step --layers 2        # base width and shapes, 2 layers (a busy machine)
    python -m benchmarks.train_step --device gpu      # bf16: text MLM 32 x 512, audio CTC 8 x 15 s, + cuDNN

Text: Data2VecTextForMaskedLM, 15% of positions per row masked (a static count), labels -100 elsewhere.
Flax variants: the package's full head (logits for every token), the same with `scan_layers=True` (compile
time), and the head on the masked positions only (`masked_positions`). Audio: Data2VecAudioForCTC with the
feature encoder frozen (torch `freeze_feature_encoder()`, flax `freeze_feature_encoder=True` plus no optimizer
update for its params), SpecAugment and dropout on as in training; layerdrop set to 0 in both (both skip dropped
layers, but a random number of skipped layers per step would add noise to the timings). On GPU the cuDNN
variant pads the frame axis to a multiple of 128 inside the encoder (`frame_multiple=128`).
On GPU the attention dropout is set to 0 in every variant: flax runs its explicit-softmax path whenever
attention dropout is active, and cuDNN attention needs it off.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from benchmarks import common, models
from flax_data2vec.registry import from_transformers

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.98), 1e-6, 0.01
MASK_FRACTION = 0.15


def adamw() -> optax.GradientTransformation:
    return optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)


def torch_adamw(model, device: str):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=device == "cuda")


def _torch_step(model, opt, batch: dict, device: str, bf16: bool, losses_out: list):
    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        common.torch_sync(device)
        losses_out.append(float(loss.detach()))
    return run


class FlaxTrainer:
    """Jitted step (params and optimizer state donated); `loss_fn(params, batch, rng) -> scalar`."""

    def __init__(self, loss_fn, params, tx: optax.GradientTransformation, batch, seed: int = 0):
        def step(params, opt_state, batch, rng):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss
        self.params, self.opt_state = params, jax.jit(tx.init)(params)
        self.batch, self.rng, self.losses = batch, jax.random.PRNGKey(seed), []
        self.step, self.compile_s = common.compile_jit(jax.jit(step, donate_argnums=(0, 1)), self.params,
                                                       self.opt_state, batch, self.rng)
        self.flops = common.xla_flops(self.step)

    def __call__(self):
        self.rng, key = jax.random.split(self.rng)
        self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.batch, key)
        jax.block_until_ready((self.params, self.opt_state, loss))
        self.losses.append(loss)


def _add_rows(rows, wl, timings, flax_flops, work, unit, torch_name):
    for n, t in timings.items():
        rows.append(common.Row(wl, n, t, work=work, unit=unit, baseline=None if n.startswith("torch") else torch_name,
                               flops=flax_flops.get(n)))


# ---------------------------------------------------------------------------------------------------------------
# text MLM
def mlm_batch(batch: int, length: int, vocab: int, mask_id: int, seed: int = 0):
    """Ids with a static 15% of positions per row replaced by <mask>; full labels and (positions, targets)."""
    rng = np.random.default_rng(seed)
    ids = models.token_ids(batch, length, vocab, seed)
    k = max(1, round(MASK_FRACTION * length))
    positions = np.sort(np.stack([rng.choice(length, k, replace=False) for _ in range(batch)]), axis=1)
    targets = np.take_along_axis(ids, positions, axis=1)
    labels = np.full_like(ids, -100)
    np.put_along_axis(labels, positions, targets, axis=1)
    inputs = ids.copy()
    np.put_along_axis(inputs, positions, mask_id, axis=1)
    return inputs, labels, positions, targets


def bench_text(args, rows: list, extra: dict) -> None:
    gpu = args.device == "gpu"
    tdev = "cuda" if gpu else "cpu"
    batch, length = (2, 16) if args.quick else ((32, 512) if gpu else (8, 128))
    cfg = models.text_config(args.quick, **layers(args), **({"attention_probs_dropout_prob": 0.0} if gpu else {}))
    tmodel = models.torch_model("Data2VecTextForMaskedLM", cfg, tdev).train()
    inputs, labels, positions, targets = mlm_batch(batch, length, cfg.vocab_size, cfg.vocab_size - 1)
    wl = f"text Data2VecTextForMaskedLM{depth(cfg)} train {batch}x{length} {'bf16' if gpu else 'fp32'}"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    full_batch = {"ids": jnp.asarray(inputs, jnp.int32), "labels": jnp.asarray(labels, jnp.int32)}
    masked_batch = {"ids": full_batch["ids"], "positions": jnp.asarray(positions, jnp.int32),
                    "targets": jnp.asarray(targets, jnp.int32)}

    def full_loss(module):
        return lambda p, b, rng: module.apply({"params": p}, b["ids"], labels=b["labels"], deterministic=False,
                                              rngs={"dropout": rng}).loss

    def masked_loss(module):
        return lambda p, b, rng: models.masked_mlm_loss(module, p, b["ids"], b["positions"], b["targets"], rng)

    variants = [  # name, module options, loss builder, batch
        ("flax jit, full head", dict(), full_loss, full_batch),
        ("flax jit, full head, scan_layers", dict(scan_layers=True), full_loss, full_batch),
        ("flax jit, head on masked positions only", dict(), masked_loss, masked_batch),
    ]
    if gpu:
        variants += [("flax jit cudnn, full head", dict(attention_implementation="cudnn"), full_loss, full_batch),
                     ("flax jit cudnn, head on masked positions only", dict(attention_implementation="cudnn"),
                      masked_loss, masked_batch)]
    if args.quick:
        _check_masked_loss(tmodel, full_batch, masked_batch, extra)

    torch_name = "torch eager sdpa" + (" +autocast, fused AdamW" if gpu else ", AdamW")
    torch_losses: list = []
    fns = {torch_name: _torch_step(tmodel, torch_adamw(tmodel, tdev),
                                   {"input_ids": torch.from_numpy(inputs).to(tdev),
                                    "labels": torch.from_numpy(labels).to(tdev)}, tdev, gpu, torch_losses)}
    compile_s, flops, trainers = {}, {}, {}
    for name, opts, loss_builder, b in variants:
        module, params = from_transformers(tmodel, dtype=dtype, **opts)
        trainers[name] = FlaxTrainer(loss_builder(module), params, adamw(), b)
        compile_s[name], flops[name] = trainers[name].compile_s, trainers[name].flops
        if opts.get("scan_layers"):  # XLA's cost analysis counts a loop body once: use the unrolled count
            flops[name] = flops[variants[0][0]]
        fns[name] = trainers[name]
        print(f"[{wl}] {name}: compile {compile_s[name]:.1f}s", flush=True)
    timings = common.time_interleaved(fns, args.warmup, args.repeats, compile_s)
    extra[f"{wl}: first-step loss"] = {torch_name: round(torch_losses[0], 4),
                                       **{n: round(float(t.losses[0]), 4) for n, t in trainers.items()}}
    _add_rows(rows, wl, timings, flops, batch * length, "tok", torch_name)


def _check_masked_loss(tmodel, full_batch, masked_batch, extra) -> None:
    """The masked-only head gives the full head's loss (deterministic, same params)."""
    module, params = from_transformers(tmodel)
    full = module.apply({"params": params}, full_batch["ids"], labels=full_batch["labels"]).loss
    masked = models.masked_mlm_loss(module, params, masked_batch["ids"], masked_batch["positions"],
                                    masked_batch["targets"], None, deterministic=True)
    tmodel.eval()
    with torch.no_grad():
        ref = tmodel(input_ids=torch.from_numpy(np.array(full_batch["ids"])).long(),
                     labels=torch.from_numpy(np.array(full_batch["labels"])).long()).loss.item()
    tmodel.train()
    extra["check: MLM loss torch / flax full head / flax masked-only head (eval mode)"] = (
        round(ref, 6), round(float(full), 6), round(float(masked), 6))


# ---------------------------------------------------------------------------------------------------------------
# audio CTC
def frozen_feature_encoder_tx(params) -> optax.GradientTransformation:
    """AdamW on everything except the feature encoder, which gets no update (torch: requires_grad=False)."""
    def label(p):
        return {k: (jax.tree_util.tree_map(lambda _: "frozen", v) if k == "feature_extractor" else label(v))
                if isinstance(v, dict) else "train" for k, v in p.items()}
    return optax.multi_transform({"train": adamw(), "frozen": optax.set_to_zero()}, label(params))


def bench_audio(args, rows: list, extra: dict) -> None:
    gpu = args.device == "gpu"
    tdev = "cuda" if gpu else "cpu"
    batch, seconds = (2, 1.0) if args.quick else ((8, 15.0) if gpu else (2, 5.0))
    cfg = models.audio_config(args.quick, layerdrop=0.0, **layers(args), **({"attention_dropout": 0.0} if gpu else {}))
    tmodel = models.torch_model("Data2VecAudioForCTC", cfg, tdev).train()
    tmodel.freeze_feature_encoder()
    wave = models.waveform(batch, seconds)
    frames = models.frames_for(cfg, wave.shape[1])
    label_len = max(2, frames // 5)  # ~10 characters per second of speech
    labels = np.random.default_rng(1).integers(1, cfg.vocab_size, (batch, label_len)).astype(np.int64)
    wl = (f"audio Data2VecAudioForCTC{depth(cfg)} train {batch}x{seconds:g}s ({frames} frames) "
          f"{'bf16' if gpu else 'fp32'}")
    dtype = jnp.bfloat16 if gpu else jnp.float32
    jbatch = {"wave": jnp.asarray(wave), "labels": jnp.asarray(labels, jnp.int32)}

    def module_loss(module):
        return lambda p, b, rng: module.apply({"params": p}, b["wave"], labels=b["labels"], deterministic=False,
                                              rngs={"dropout": rng}).loss

    variants = [("flax jit", dict(), module_loss), ("flax jit, scan_layers", dict(scan_layers=True), module_loss)]
    if gpu:
        variants.append((f"flax jit cudnn, frames padded to {-(-frames // 128) * 128}",
                         dict(attention_implementation="cudnn", frame_multiple=128), module_loss))

    torch_name = "torch eager sdpa" + (" +autocast, fused AdamW" if gpu else ", AdamW")
    torch_losses: list = []
    fns = {torch_name: _torch_step(tmodel, torch_adamw(tmodel, tdev),
                                   {"input_values": torch.from_numpy(wave).to(tdev),
                                    "labels": torch.from_numpy(labels).to(tdev)}, tdev, gpu, torch_losses)}
    compile_s, flops, trainers = {}, {}, {}
    for name, opts, loss_builder in variants:
        module, params = from_transformers(tmodel, dtype=dtype, freeze_feature_encoder=True, **opts)
        trainers[name] = FlaxTrainer(loss_builder(module), params, frozen_feature_encoder_tx(params), jbatch)
        compile_s[name], flops[name] = trainers[name].compile_s, trainers[name].flops
        if opts.get("scan_layers"):  # XLA's cost analysis counts a loop body once: use the unrolled count
            flops[name] = flops[variants[0][0]]
        fns[name] = trainers[name]
        print(f"[{wl}] {name}: compile {compile_s[name]:.1f}s", flush=True)
    timings = common.time_interleaved(fns, args.warmup, args.repeats, compile_s)
    extra[f"{wl}: first-step loss"] = {torch_name: round(torch_losses[0], 3),
                                       **{n: round(float(t.losses[0]), 3) for n, t in trainers.items()}}
    _add_rows(rows, wl, timings, flops, batch * seconds, "audio-s", torch_name)


def layers(args) -> dict:
    """Config override of --layers (the model's width and the shapes stay): a smaller run of the same step."""
    return {"num_hidden_layers": args.layers} if args.layers else {}


def depth(cfg) -> str:
    """' (2 layers)' in a workload's name when --layers changed the depth from the config's default."""
    return "" if cfg.num_hidden_layers == type(cfg)().num_hidden_layers else f" ({cfg.num_hidden_layers} layers)"


def main(argv=None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=0, help="Transformer layers (0: the config's; base: 12)")
    args = parser.parse_args(argv)
    info = common.setup(args)
    rows: list[common.Row] = []
    extra: dict = {}
    if args.only in (None, "text"):
        bench_text(args, rows, extra)
    if args.only in (None, "audio"):
        bench_audio(args, rows, extra)
    common.report(rows, info, args, extra)


if __name__ == "__main__":
    sys.exit(main())
