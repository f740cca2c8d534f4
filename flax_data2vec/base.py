"""What every model class shares: the config plus the speed switches (dtype, scan, remat, attention)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class ConfigModule(nn.Module):
    """A submodule built from the model config, computing in `dtype` with params stored in `param_dtype`."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


class ModelOptions(ConfigModule):
    """Fields every model class takes: the config and the speed switches.

    dtype: compute dtype (e.g. bfloat16); param_dtype: storage dtype of parameters (keep float32).
    scan_layers: run the layers under `nn.scan` (one compiled layer; params stacked under `layers`).
    remat: rematerialise each layer in the backward pass (less memory, ~30% more compute).
    attention_implementation: passed to `jax.nn.dot_product_attention` (None/'xla', or 'cudnn' on GPU).
    """

    scan_layers: bool = False
    remat: bool = False
    attention_implementation: str | None = None

    @property
    def options(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers, remat=self.remat,
                    attention_implementation=self.attention_implementation)
