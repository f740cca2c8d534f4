"""`text-generation` with Data2VecTextForCausalLM: the whole decode loop runs on device in one `lax.while_loop`
over the KV cache (greedy, or sampling with temperature / top-k / top-p), stopping at eos or max_new_tokens.

Prompts of one batch are left-padded to a bucketed length; their positions are given explicitly (RoBERTa
positions count real tokens only), so a padded prompt continues exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..text import init_cache
from .base import Forward, Model, Stats, bucket, length_batches
from .text import TextPipeline


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy unless do_sample; top_k 0 and top_p 1.0 switch those filters off."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0


def filter_logits(logits, s: Sampling):
    """Temperature, then top-k, then nucleus (top-p) filtering, as transformers' logits warpers apply them."""
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = cumulative <= 1 - s.top_p
        drop_sorted = drop_sorted.at[:, -1].set(False)  # keep at least the best token
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


class TextGenerationPipeline(TextPipeline):
    """`pipeline("text-generation")(prompt, max_new_tokens=, do_sample=, temperature=, top_k=, top_p=)`."""

    task = "text-generation"
    architectures = ("Data2VecTextForCausalLM",)

    def __init__(self, model: Model, **kw):
        if not model.module.config.is_decoder:
            raise ValueError("text-generation needs a causal model: its config.json must have is_decoder=true")
        self._loops: dict[Sampling, Forward] = {}
        super().__init__(model, **kw)

    def forward_fn(self, params, ids, mask):  # the prefill-only program; generation builds `_loop`s
        return self.module.apply({"params": params}, ids, mask).logits

    @property
    def stats(self) -> Stats:
        parts = [self.forward.stats, *(f.stats for f in self._loops.values())]
        return Stats(*(sum(getattr(p, f.name) for p in parts) for f in dataclasses.fields(Stats)))

    def _loop(self, s: Sampling) -> Forward:
        if s not in self._loops:
            self._loops[s] = Forward(lambda params, *a: self._generate(params, s, *a), self.forward.params,
                                     self.mesh, self.parallel)
        return self._loops[s]

    def _generate(self, params, s: Sampling, ids, mask, row_keys):
        """(batch, max_new_tokens) new token ids, pad after eos; ids/mask are left-padded prompts; each row
        samples from its own key (batch, 2), so the draws do not depend on how rows are split over devices."""
        c, module = self.config, self.module
        batch, prompt = ids.shape
        eos = -1 if c.eos_token_id is None else c.eos_token_id
        real = mask.astype(jnp.int32)
        positions = (jnp.cumsum(real, -1) * real + self.pad_id).astype(jnp.int32)
        cache = init_cache(module, batch, prompt + s.max_new_tokens)
        out, mutated = module.apply({"params": params, "cache": cache}, ids, mask, position_ids=positions,
                                    decode=True, mutable=["cache"])
        next_pos = positions.max(-1, keepdims=True) + 1

        def choose(logits, keys):
            logits = logits.astype(jnp.float32)
            if not s.do_sample:
                return jnp.argmax(logits, -1).astype(jnp.int32)
            return jax.vmap(jax.random.categorical)(keys, filter_logits(logits, s)).astype(jnp.int32)

        def cond(state):
            step, _, _, _, done, _, _ = state
            return (step < s.max_new_tokens) & ~done.all()

        def body(state):
            step, logits, cache, pos, done, tokens, keys = state
            keys, subs = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
            token = jnp.where(done, self.pad_id, choose(logits, subs))
            tokens = tokens.at[:, step].set(token)
            done = done | (token == eos)
            out, mutated = module.apply({"params": params, "cache": cache}, token[:, None],
                                        jnp.ones((batch, 1), jnp.int32), position_ids=pos, decode=True,
                                        mutable=["cache"])
            return step + 1, out.logits[:, -1], mutated["cache"], pos + 1, done, tokens, keys

        tokens = jnp.full((batch, s.max_new_tokens), self.pad_id, jnp.int32)
        state = (0, out.logits[:, -1], mutated["cache"], next_pos, jnp.zeros((batch,), bool), tokens, row_keys)
        return jax.lax.while_loop(cond, body, state)[5]

    def run(self, items: list, options: dict) -> list:
        full_text = options.pop("return_full_text", True)
        as_ids = options.pop("return_tensors", False)
        seed = options.pop("seed", 0)
        fields = {f.name for f in dataclasses.fields(Sampling)}
        unknown = set(options) - fields
        if unknown:
            raise TypeError(f"unknown text-generation options: {sorted(unknown)}")
        s = Sampling(**options)
        if s.max_new_tokens < 1 or s.temperature <= 0 or not 0 < s.top_p <= 1:
            raise ValueError(f"need max_new_tokens >= 1, temperature > 0 and 0 < top_p <= 1, got {s}")
        prompts = [self.tokenizer(x, add_special_tokens=False)["input_ids"] if isinstance(x, str) else None
                   for x in items]
        if any(p is None or not p for p in prompts):
            raise ValueError("text-generation takes non-empty strings")
        room = self.max_length - s.max_new_tokens
        if any(len(p) > room for p in prompts):
            raise ValueError(f"a prompt of {max(map(len, prompts))} tokens + max_new_tokens={s.max_new_tokens} "
                             f"exceeds the model's {self.max_length} positions")
        loop, new = self._loop(s), {}
        # one key per input (and per filler row): a prompt's draw depends on the seed and its place in `items`
        keys = np.asarray(jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed),
                                                                   np.arange(len(items) + self.batch_size)))
        for idx in length_batches([len(p) for p in prompts], self.batch_size):
            width = min(bucket(max(len(prompts[i]) for i in idx), 8, 8), room)
            ids = np.full((self.batch_size, width), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, width), np.int32)
            mask[:, -1] = 1
            for row, i in enumerate(idx):
                ids[row, width - len(prompts[i]):] = prompts[i]
                mask[row, width - len(prompts[i]):] = 1
            t0, start = loop.stats.compile_s, time.perf_counter()
            rows = list(idx) + list(range(len(items), len(items) + self.batch_size - len(idx)))  # fillers last
            tokens = loop.fetch(loop(ids, mask, keys[rows]))
            loop.stats.run_s += time.perf_counter() - start - (loop.stats.compile_s - t0)
            new.update({i: tokens[row] for row, i in enumerate(idx)})
        return [[self._output(items[i], prompts[i], new[i], full_text, as_ids)] for i in range(len(items))]

    def _output(self, prompt: str, prompt_ids, new_ids: np.ndarray, full_text: bool, as_ids: bool) -> dict:
        eos = self.config.eos_token_id
        new_ids = [int(t) for t in new_ids]
        if eos in new_ids:
            new_ids = new_ids[:new_ids.index(eos) + 1]
        if as_ids:
            return {"generated_token_ids": (list(prompt_ids) if full_text else []) + new_ids}
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return {"generated_text": prompt + text if full_text else text}
