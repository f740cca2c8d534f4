"""Value checks of labels and token ids: eager (concrete arrays) raise at once; under jit, `checkify` on request.

Eagerly, `check_ids` raises ValueError naming the argument, its allowed range and the first bad value. Under
`jax.jit` values are not known at trace time, so nothing is checked unless the function was traced inside
`debug_checks()` and functionalised with `jax.experimental.checkify` — which `checked(fn)` does in one call:

    loss_fn = fd.checked(lambda p, x, y: model.apply({"params": p}, x, labels=y).loss)
    loss_fn(params, x, bad_labels)  # raises JaxRuntimeError: labels must lie in [0, 32) or be -100, got -1
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_TRACED = contextvars.ContextVar("flax_data2vec_traced_checks", default=False)


@contextlib.contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """While tracing inside this block, value checks become `checkify.check`s (wrap with `checkify.checkify`)."""
    token = _TRACED.set(enabled)
    try:
        yield
    finally:
        _TRACED.reset(token)


def checked(fn: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fn)` with the value checks compiled in: a bad label or token id raises instead of giving garbage."""
    def traced(*args, **kwargs):
        with debug_checks():
            return fn(*args, **kwargs)
    jitted = jax.jit(checkify.checkify(traced, errors=checkify.user_checks), **jit_kwargs)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        error, out = jitted(*args, **kwargs)
        error.throw()
        return out
    return run


def check_ids(name: str, values, upper: int, ignore: int | None = None) -> None:
    """`values` must lie in [0, upper) or equal `ignore`: checked now if concrete, by checkify if traced and on."""
    if values is None or not np.size(values):
        return
    allowed = f"[0, {upper})" + (f" or be {ignore}" if ignore is not None else "")
    if isinstance(values, jax.core.Tracer):
        if _TRACED.get():
            bad = (values < 0) | (values >= upper)
            if ignore is not None:
                bad &= values != ignore
            first = jnp.where(bad.any(), values.reshape(-1)[jnp.argmax(bad.reshape(-1))], 0)
            checkify.check(~bad.any(), f"{name} must lie in {allowed}, got {{first}}", first=first)
        return
    values = np.asarray(values)
    bad = (values < 0) | (values >= upper)
    if ignore is not None:
        bad &= values != ignore
    if bad.any():
        raise ValueError(f"{name} must lie in {allowed}, got {int(values[bad].reshape(-1)[0])}")
