"""Read a fairseq `.pt` checkpoint without running its pickle's code, and without fairseq or omegaconf.

`torch.load(weights_only=True)` refuses every global outside torch's allowlist. fairseq files reference a
few more (REFERENCE.md §5.5.1): `fairseq.data.dictionary.Dictionary` (CTC target dictionary), numpy scalars
(training meters), omegaconf containers (a cfg re-saved after fairseq's loader) and `argparse.Namespace`
(pre-2021 `args`). Exactly those names are allowed, mapped to inert stand-ins (a `__new__` that ignores its
arguments, a `__setstate__` that stores the state), and turned into plain dicts/lists afterwards. Any other
global is refused with its name. `weights_only=False` is never used.
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import re
import typing
from typing import Any

import numpy as np

from .integrity import CheckpointError


class _StandIn:
    """Inert object for an allowed class: builds from nothing, keeps its pickled state, runs no code."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "_pickled_state", state)

    def state(self) -> dict:
        state = getattr(self, "_pickled_state", None) or {}
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        return state if isinstance(state, dict) else {}


class Dictionary(_StandIn):
    """fairseq.data.dictionary.Dictionary: `symbols`, `count`, `indices` and the special ids."""


class DictConfig(_StandIn):
    """omegaconf DictConfig: child nodes in `_content`."""


class ListConfig(_StandIn):
    """omegaconf ListConfig: child nodes in `_content`."""


class ValueNode(_StandIn):
    """omegaconf AnyNode / StringNode / ...: the value in `_val`."""


class Metadata(_StandIn):
    """omegaconf (Container)Metadata: type information only, dropped."""


def _numpy_globals() -> list[tuple[Any, str]]:
    """numpy scalars and arrays, under the module paths numpy 1 and numpy 2 pickle them with."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(core.scalar, f"{module}.scalar"), (core._reconstruct, f"{module}._reconstruct")]
    out += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    out += [(getattr(np.dtypes, n), f"numpy.dtypes.{n}") for n in dir(np.dtypes) if n.endswith("DType")]
    return out


_OMEGACONF_NODES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode", "BytesNode",
                    "PathNode")


def allowed_globals() -> list[tuple[Any, str]]:
    """(object, "module.Name") pairs for `torch.serialization.safe_globals`: exactly the names fairseq files use."""
    allowed = [(Dictionary, "fairseq.data.dictionary.Dictionary"),
               (DictConfig, "omegaconf.dictconfig.DictConfig"), (ListConfig, "omegaconf.listconfig.ListConfig"),
               (Metadata, "omegaconf.base.ContainerMetadata"), (Metadata, "omegaconf.base.Metadata"),
               (argparse.Namespace, "argparse.Namespace"), (collections.defaultdict, "collections.defaultdict"),
               (typing.Any, "typing.Any")]
    allowed += [(ValueNode, f"omegaconf.nodes.{n}") for n in _OMEGACONF_NODES]
    allowed += [(t, f"builtins.{t.__name__}") for t in (int, float, str, bool, dict, list, tuple)]
    return allowed + _numpy_globals()


def to_plain(obj: Any) -> Any:
    """Stand-ins, Namespaces and numpy values -> dicts, lists and Python scalars; tensors are left as they are."""
    if isinstance(obj, DictConfig):
        content = obj.state().get("_content")
        return {k: to_plain(v) for k, v in content.items()} if isinstance(content, dict) else content
    if isinstance(obj, ListConfig):
        content = obj.state().get("_content")
        return [to_plain(v) for v in content] if isinstance(content, (list, tuple)) else content
    if isinstance(obj, ValueNode):
        return to_plain(obj.state().get("_val"))
    if isinstance(obj, Metadata):
        return None
    if isinstance(obj, Dictionary):
        return {k: to_plain(v) for k, v in obj.state().items()}
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The pickled dict of a fairseq checkpoint, with cfg / task_state / args as plain data and tensors as torch."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a fairseq (PyTorch) checkpoint and reading it needs torch: "
                          "`pip install torch`") from e
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        if found:
            raise CheckpointError(f"refused: this file's pickle calls `{found.group(1)}`, which is not allowed "
                                  f"({path}; fairseq checkpoints need only tensors, plain containers, fairseq's "
                                  "Dictionary, numpy scalars and omegaconf/argparse configs)") from None
        raise CheckpointError(f"cannot read {path}: its pickle is invalid ({_first_line(e)})") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # zip errors, EOF, RuntimeError from torch's reader: a damaged file
        raise CheckpointError(f"cannot read {path}: it is corrupted or truncated ({_first_line(e)}); "
                              "delete it and download it again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a fairseq checkpoint: it holds a {type(state).__name__}, "
                              "not a dict with 'model' and 'cfg'")
    return to_plain(state)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
