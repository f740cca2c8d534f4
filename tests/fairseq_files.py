"""Writers of fairseq-format `.pt` files for the tests, as fairseq's trainer saves them (REFERENCE.md §5.5.1).

fairseq and omegaconf cannot be installed here, so their classes are stood in by small classes registered
under the real module paths in `sys.modules` while the file is written: the pickle then names exactly the
globals a real file names (`fairseq.data.dictionary.Dictionary`, `omegaconf.dictconfig.DictConfig`, ...).
"""

from __future__ import annotations

import contextlib
import sys
import types
import typing

import numpy as np
import torch

FAKE_MODULES = ("fairseq", "fairseq.data", "fairseq.data.dictionary", "omegaconf", "omegaconf.dictconfig",
                "omegaconf.listconfig", "omegaconf.base", "omegaconf.nodes")


def _class(module: str, name: str, body: dict | None = None) -> type:
    cls = type(name, (), dict(body or {}))
    cls.__module__, cls.__qualname__ = module, name
    setattr(sys.modules[module], name, cls)
    return cls


@contextlib.contextmanager
def fake_fairseq_classes():
    """Yield {name: class} for Dictionary, DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode."""
    clash = [m for m in FAKE_MODULES if m in sys.modules]
    assert not clash, f"real modules present: {clash}"
    for m in FAKE_MODULES:
        sys.modules[m] = types.ModuleType(m)
    try:
        yield {
            "Dictionary": _class("fairseq.data.dictionary", "Dictionary"),
            "DictConfig": _class("omegaconf.dictconfig", "DictConfig"),
            "ListConfig": _class("omegaconf.listconfig", "ListConfig"),
            "ContainerMetadata": _class("omegaconf.base", "ContainerMetadata"),
            "Metadata": _class("omegaconf.base", "Metadata"),
            "AnyNode": _class("omegaconf.nodes", "AnyNode"),
        }
    finally:
        for m in FAKE_MODULES:
            del sys.modules[m]


def dictionary(classes: dict, symbols: list[str]):
    """A fairseq Dictionary object (its __dict__ as dictionary.py 20-43 sets it)."""
    d = classes["Dictionary"]()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    all_symbols = specials + symbols
    d.__dict__.update(bos_word="<s>", unk_word="<unk>", pad_word="<pad>", eos_word="</s>", symbols=all_symbols,
                      count=[1] * len(all_symbols), indices={s: i for i, s in enumerate(all_symbols)},
                      bos_index=0, pad_index=1, eos_index=2, unk_index=3, nspecial=4)
    return d


def dict_config(classes: dict, value, parent=None, key=None):
    """`OmegaConf.create(value)` as pickled: containers with `_content`, value nodes with `_val`, metadata."""
    if isinstance(value, (dict, list)):
        is_dict = isinstance(value, dict)
        node = classes["DictConfig" if is_dict else "ListConfig"]()
        meta = classes["ContainerMetadata"]()
        meta.__dict__.update(ref_type=typing.Any, object_type=dict if is_dict else list, optional=True, key=key,
                             flags={}, key_type=typing.Any, element_type=typing.Any)
        items = value.items() if is_dict else enumerate(value)
        content = {k: dict_config(classes, v, node, k) for k, v in items}
        node.__dict__.update(_metadata=meta, _parent=parent, _flags_cache=None,
                             _content=content if is_dict else list(content.values()))
        return node
    node = classes["AnyNode"]()
    meta = classes["Metadata"]()
    meta.__dict__.update(ref_type=typing.Any, object_type=None, optional=True, key=key, flags=None)
    node.__dict__.update(_metadata=meta, _parent=parent, _val=value)
    return node


def save_fairseq(path, model: dict, cfg: dict, *, task_state: dict | None = None, resaved: bool = False,
                 metrics=None, extra=None, symbols: list[str] | None = None) -> str:
    """torch.save a trainer-style state dict. `resaved`: cfg as a DictConfig (a file re-saved after fairseq's
    loader); `symbols`: a CTC target Dictionary in task_state; `metrics`: a numpy scalar meter value."""
    with fake_fairseq_classes() as classes:
        task = dict(task_state or {})
        if symbols is not None:
            task["target_dictionary"] = dictionary(classes, symbols)
        state = {
            "args": None, "cfg": dict_config(classes, cfg) if resaved else cfg, "model": model, "criterion": None,
            "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": None}, "num_updates": 1000}],
            "task_state": task,
            "extra_state": {"metrics": {"train": [(0, "loss", "AverageMeter",
                                                   {"val": np.float64(1.5) if metrics is None else metrics})]},
                            "previous_training_time": 12.5, "train_iterator": {"epoch": 3}, "best": None},
        }
        if extra is not None:
            state["extra"] = extra
        torch.save(state, path)
    return str(path)


def half(state_dict: dict) -> dict:
    """fp16 copies (fairseq's `model.half()` with common.fp16: true)."""
    return {k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in state_dict.items()}


class WritesMarker:
    """A hostile object: unpickling it would run `os.system("touch <marker>")`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)
