"""Orbax checkpoints of flax_data2vec models: params plus a transformers `config.json`, written atomically.

A checkpoint directory holds
    config.json          the transformers config; `architectures` names the class
    params/              the params (Orbax StandardCheckpointer), layers unrolled as in `weights.unscan_params`
    flax_data2vec.json   written last, so its presence marks a complete checkpoint: format version, class,
                         module options that shape the param tree (e.g. `add_pooling_layer`)

Every write goes to `<dst>.tmp-<pid>` beside `dst` and is renamed into place, so an interrupted write
leaves nothing that reads as a checkpoint; leftovers of dead writers are removed by the next write.
`restore(..., sharding=...)` reads each array straight into its device sharding through Orbax.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import registry
from .weights import scan_params, unscan_params

MARKER = "flax_data2vec.json"
FORMAT_VERSION = 1
# module fields that change speed or precision but not which params exist
SPEED_OPTIONS = frozenset({"dtype", "param_dtype", "scan_layers", "remat", "attention_implementation",
                           "freeze_feature_encoder", "frame_multiple"})

ShardingSpec = Any  # a jax.sharding.Sharding, or a function (path: tuple[str, ...], shape) -> Sharding


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` is a complete checkpoint written by `save`."""
    return os.path.isfile(os.path.join(path, MARKER))


# ---------------------------------------------------------------------------------------------------------------
# atomic directories
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_writes(dst: str) -> None:
    """Clean up after writers of `dst` that died: delete `<dst>.tmp-<pid>`; put back a `<dst>.old-<pid>`
    (a replaced `dst` whose replacement never arrived) if `dst` is missing, else delete it."""
    dst = os.path.abspath(dst)
    parent, base = os.path.split(dst)
    if not os.path.isdir(parent):
        return
    pattern = re.compile(re.escape(base) + r"\.(tmp|old)-(\d+)")
    for entry in sorted(os.listdir(parent)):
        m = pattern.fullmatch(entry)
        if m and (int(m.group(2)) == os.getpid() or not _pid_alive(int(m.group(2)))):
            if m.group(1) == "old" and not os.path.lexists(dst):
                os.replace(os.path.join(parent, entry), dst)
            else:
                _remove(os.path.join(parent, entry))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield an empty temp directory beside `dst` that becomes `dst` when the block succeeds.

    On an exception the temp directory is removed and `dst` is untouched. An existing `dst` is an error
    (FileExistsError) unless `overwrite`, in which case it is swapped out only after the new one is complete.
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    remove_stale_writes(dst)
    tmp = f"{dst}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.lexists(dst):
            if not overwrite:
                raise FileExistsError(f"{dst} was created by someone else while this write ran")
            old = f"{dst}.old-{os.getpid()}"
            os.replace(dst, old)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old, dst)
                raise
            _remove(old)
        else:
            try:
                os.replace(tmp, dst)
            except OSError as e:  # a directory cannot replace a non-empty one: another writer got there first
                if os.path.lexists(dst):
                    raise FileExistsError(f"{dst} was created by someone else while this write ran") from e
                raise
    finally:
        _remove(tmp)


# ---------------------------------------------------------------------------------------------------------------
# save / restore
def structural_options(module) -> dict:
    """Module fields, besides config and speed switches, that differ from their defaults (JSON values only)."""
    out = {}
    for name, field in type(module).__dataclass_fields__.items():
        if name in SPEED_OPTIONS or name in ("config", "parent", "name") or not field.init:
            continue
        value = getattr(module, name)
        if value != field.default and isinstance(value, (bool, int, float, str, type(None))):
            out[name] = value
    return out


def _this_process_only():
    """Orbax options for a write done by one process alone (host-side numpy params; no cross-host barrier)."""
    import orbax.checkpoint as ocp
    if jax.process_count() == 1:
        return ocp.options.MultiprocessingOptions()
    return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                              active_processes={jax.process_index()},
                                              barrier_sync_key_prefix=f"save-{jax.process_index()}")


def save(directory: str | os.PathLike, module, params, overwrite: bool = False, metadata: dict | None = None) -> str:
    """Write `params` of `module` as an Orbax checkpoint with its config.json; returns the directory."""
    name = type(module).__name__
    config = module.config.replace(architectures=(name,))
    params = unscan_params(params)
    info = {"format_version": FORMAT_VERSION, "architecture": name, "module_options": structural_options(module),
            **(metadata or {})}
    directory = os.path.abspath(os.fspath(directory))
    import orbax.checkpoint as ocp  # imported on use: it is slow to import
    with atomic_directory(directory, overwrite) as tmp:
        config.to_json_file(os.path.join(tmp, "config.json"))
        with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as checkpointer:
            checkpointer.save(os.path.join(tmp, "params"), params)
            checkpointer.wait_until_finished()
        with open(os.path.join(tmp, MARKER), "w") as f:  # last: marks the checkpoint complete
            json.dump(info, f, indent=2, sort_keys=True)
    return directory


def read_metadata(directory: str | os.PathLike) -> dict:
    """The contents of `flax_data2vec.json`; a clear error if the checkpoint is incomplete."""
    path = os.path.join(directory, MARKER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a complete flax_data2vec checkpoint (no {MARKER})")
    with open(path) as f:
        info = json.load(f)
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {info.get('format_version')!r} is not {FORMAT_VERSION}; "
                         "this checkpoint was written by another version of flax_data2vec")
    return info


def build_module(directory: str | os.PathLike, dtype=None, param_dtype=None, **module_options):
    """The module a checkpoint was saved from, with compute `dtype`, `param_dtype` and extra options."""
    info = read_metadata(directory)
    name = info["architecture"]
    config = registry.config_class(name).from_pretrained(directory)
    options = {**info["module_options"], **module_options}
    return registry.model_class(name)(config=config, dtype=dtype or jnp.float32,
                                      param_dtype=param_dtype or jnp.float32, **options)


def host_sharding() -> jax.sharding.Sharding:
    """Host memory (the CPU device), where conversions run whatever the accelerator."""
    return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])


def place_sharding(sharding: ShardingSpec | None, path: tuple[str, ...], shape: tuple) -> jax.sharding.Sharding:
    """The device sharding of the param at `path` (keys of the unrolled tree)."""
    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return sharding
    if callable(sharding):
        return sharding(path, shape)
    raise TypeError(f"sharding must be a jax.sharding.Sharding or a function (path, shape) -> Sharding, "
                    f"got {type(sharding).__name__}")


def target_tree(module, sharding: ShardingSpec | None) -> dict:
    """ShapeDtypeStructs (unrolled layout, module.param_dtype) carrying the sharding of every param."""
    def leaf(path, x):
        keys = tuple(str(k.key) for k in path)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place_sharding(sharding, keys, tuple(x.shape)))
    return jax.tree_util.tree_map_with_path(leaf, registry.abstract_params(module))


def _check_fits(saved: dict, target: dict, directory) -> None:
    """Name the first param whose presence or shape differs between the checkpoint and the module."""
    saved = traverse_util.flatten_dict(saved, sep="/")
    want = traverse_util.flatten_dict(target, sep="/")
    missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or unexpected:
        raise ValueError(f"{directory} does not fit the model: missing {missing or 'nothing'}, "
                         f"unexpected {unexpected or 'nothing'}")
    for key, value in want.items():
        if tuple(saved[key].shape) != tuple(value.shape):
            raise ValueError(f"{directory} does not fit the model: {key} has shape {tuple(saved[key].shape)} in the "
                             f"checkpoint, the config expects {tuple(value.shape)}")


def restore_params(directory: str | os.PathLike, module, sharding: ShardingSpec | None = None) -> dict:
    """Params of `module` (unrolled, cast to module.param_dtype), each read into its device sharding."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(os.path.join(directory, "params"))
    target = target_tree(module, sharding)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            meta = checkpointer.metadata(path)
        except Exception as e:  # Orbax raises many types for a damaged directory
            raise ValueError(f"could not read the Orbax params in {path}: {e}") from e
        saved = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        if saved is not None:
            _check_fits(saved, target, directory)
        return checkpointer.restore(path, target)


def restore(directory: str | os.PathLike, dtype=None, param_dtype=None,
            sharding: ShardingSpec | None = None, **module_options) -> tuple[Any, dict]:
    """(module, params) from a checkpoint written by `save`; `sharding` as in `place_sharding`."""
    module = build_module(directory, dtype, param_dtype, **module_options)
    params = restore_params(directory, module, sharding)
    return module, (scan_params(params) if module.scan_layers else params)


def shardings_of(module, sharding: ShardingSpec | None) -> dict:
    """The tree of target shardings (unrolled layout), e.g. for `jax.jit(..., out_shardings=...)`."""
    return jax.tree_util.tree_map(lambda x: x.sharding, target_tree(module, sharding))


def put(params: dict, module, sharding: ShardingSpec | None) -> dict:
    """Move params (unrolled) through host memory to their target shardings, cast to module.param_dtype."""
    def move(x, s):
        return jax.device_put(np.asarray(x).astype(module.param_dtype), s)
    return jax.tree_util.tree_map(move, params, shardings_of(module, sharding))


def init_new(module, params: dict, paths: list[str], rng: int | jax.Array = 0,
             sharding: ShardingSpec | None = None) -> dict:
    """Params (unrolled) with those at `paths` freshly initialised from `rng`, in their target shardings.

    Only those leaves are computed: under jit XLA prunes the rest of the model's init.
    """
    if not paths:
        return params
    unrolled = module.clone(scan_layers=False)
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    targets = traverse_util.flatten_dict(shardings_of(module, sharding), sep="/")

    def init(k):
        fresh = traverse_util.flatten_dict(registry.init_params(unrolled, k), sep="/")
        return {p: fresh[p] for p in paths}
    flat = traverse_util.flatten_dict(params, sep="/")
    flat.update(jax.jit(init, out_shardings={p: targets[p] for p in paths})(key))
    return traverse_util.unflatten_dict(flat, sep="/")
