"""Orbax checkpoints of flax_data2vec models: params plus a transformers `config.json`, written atomically.

A checkpoint directory holds
    config.json          the transformers config; `architectures` names the class
    params/              the params (Orbax StandardCheckpointer), layers unrolled as in `weights.unscan_params`
    flax_data2vec.json   written last, so its presence marks a complete checkpoint: format version, class,
                         module options that shape the param tree (e.g. `add_pooling_layer`), and the size and
                         SHA-256 of every other file (`files`), checked on load

Writes go through `publish.atomic_directory` (a temp directory renamed into place), so an interrupted write
leaves nothing that reads as a checkpoint. `restore(..., sharding=...)` reads each array straight into its
device sharding through Orbax, after the files are checked against the marker, and refuses non-finite weights.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import registry
from .integrity import CheckpointError, check_finite_params, check_listed_files, manifest
from .publish import DiskFullError, atomic_directory, is_disk_full, remove_stale_writes  # noqa: F401 - the writers' API
from .weights import scan_params, unscan_params

MARKER = "flax_data2vec.json"
FORMAT_VERSION = 2  # 2 adds `files`; version 1 checkpoints load without checksums
READABLE_VERSIONS = (1, 2)
# module fields that change speed or precision but not which params exist
SPEED_OPTIONS = frozenset({"dtype", "param_dtype", "scan_layers", "remat", "attention_implementation",
                           "freeze_feature_encoder", "frame_multiple"})

ShardingSpec = Any  # a jax.sharding.Sharding, or a function (path: tuple[str, ...], shape) -> Sharding


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` has the marker `save` writes last (its contents are checked by `read_metadata`)."""
    return os.path.isfile(os.path.join(path, MARKER))


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


def save(directory: str | os.PathLike, module, params, overwrite: bool = False, metadata: dict | None = None,
         assets: Callable[[str], None] | None = None) -> str:
    """Write `params` of `module` as an Orbax checkpoint with its config.json; returns the directory.

    assets(tmp_dir): writes further files (tokenizer, vocabulary) into the checkpoint before it is published,
    so that the marker's checksums cover them too. Non-finite params are refused, naming the first.
    """
    name = type(module).__name__
    config = module.config.replace(architectures=(name,))
    params = unscan_params(params)
    directory = os.path.abspath(os.fspath(directory))
    check_finite_params(params, f"refusing to save {directory}")
    info = {"format_version": FORMAT_VERSION, "architecture": name, "module_options": structural_options(module),
            **(metadata or {})}
    need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params))
    import orbax.checkpoint as ocp  # imported on use: it is slow to import
    try:
        with atomic_directory(directory, overwrite, need_bytes=need + 2**20) as tmp:
            config.to_json_file(os.path.join(tmp, "config.json"))
            with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as checkpointer:
                checkpointer.save(os.path.join(tmp, "params"), params)
                checkpointer.wait_until_finished()
            if assets is not None:
                assets(tmp)
            info["files"] = manifest(tmp, exclude=(MARKER,))
            with open(os.path.join(tmp, MARKER), "w") as f:  # last: marks the checkpoint complete
                json.dump(info, f, indent=2, sort_keys=True)
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(f"no space left on device while writing {directory}; nothing was written") from e
        raise
    return directory


def _marker_error(path: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; this marker of a complete checkpoint is damaged: rewrite the "
                           "checkpoint (or delete it, if it is a cache entry)")


def read_metadata(directory: str | os.PathLike) -> dict:
    """The contents of `flax_data2vec.json`, checked field by field; a one-line error naming what is wrong."""
    path = os.path.join(directory, MARKER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a complete flax_data2vec checkpoint (no {MARKER})")
    try:
        with open(path) as f:
            info = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise _marker_error(path, f"not valid JSON ({e})") from e
    if not isinstance(info, dict):
        raise _marker_error(path, f"holds a JSON {type(info).__name__}, expected an object")
    version = info.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format_version {version!r} is not one of {READABLE_VERSIONS}; this checkpoint "
                         "was written by another version of flax_data2vec")
    name = info.get("architecture")
    known = {**registry.model_classes(), **registry.data2vec2_classes()}
    if not isinstance(name, str) or name not in known:
        raise _marker_error(path, f"architecture {name!r} is not one of the Data2Vec classes "
                                  f"({', '.join(known)})")
    if not isinstance(info.get("module_options", {}), dict):
        raise _marker_error(path, "module_options must be an object")
    files = info.get("files")
    if version >= 2 and not (isinstance(files, dict) and "config.json" in files and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values())):
        raise _marker_error(path, "`files` must list every file (config.json included) with its size and sha256")
    info.setdefault("module_options", {})
    return info


def check_files(directory: str | os.PathLike, verify: bool = True) -> dict:
    """The marker, after checking every file it lists exists with its size and (`verify`) its SHA-256."""
    info = read_metadata(directory)
    if "files" in info:
        check_listed_files(os.fspath(directory), info["files"], MARKER, hashes=verify)
    return info


def build_module(directory: str | os.PathLike, dtype=None, param_dtype=None, **module_options):
    """The module a checkpoint was saved from, with compute `dtype`, `param_dtype` and extra options."""
    info = check_files(directory, verify=False)  # names a missing config.json as such
    name = info["architecture"]
    try:
        config = registry.config_class(name).from_pretrained(directory)
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from e
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
        raise CheckpointError(f"{directory} does not fit the model: missing {missing or 'nothing'}, "
                              f"unexpected {unexpected or 'nothing'}")
    for key, value in want.items():
        if tuple(saved[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{directory} does not fit the model: {key} has shape {tuple(saved[key].shape)} "
                                  f"in the checkpoint, the config expects {tuple(value.shape)}")


def restore_params(directory: str | os.PathLike, module, sharding: ShardingSpec | None = None,
                   verify: bool = True) -> dict:
    """Params of `module` (unrolled, cast to module.param_dtype), each read into its device sharding.

    The files are checked against the marker: presence and size first, their SHA-256 (`verify`) in a thread
    while Orbax reads, so that hashing costs little wall time; params are returned only once it passed.
    Non-finite params are refused.
    """
    info = check_files(directory, verify=False)
    hashing = None
    if verify and "files" in info:
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flax_data2vec-verify")
        hashing = pool.submit(check_listed_files, os.fspath(directory), info["files"], MARKER)
        pool.shutdown(wait=False)
    elif verify:
        warnings.warn(f"{directory} was written by an older flax_data2vec (format_version 1): it has no checksums "
                      "to verify; re-save it to add them", stacklevel=2)
    try:
        params = _read_orbax(directory, target_tree(module, sharding))
    except CheckpointError:
        if hashing is not None:
            hashing.result()  # a damaged file explains an unreadable checkpoint better than Orbax does
        raise
    if hashing is not None:
        hashing.result()
    check_finite_params(params, os.fspath(directory))
    return params


def _read_orbax(directory: str | os.PathLike, target: dict) -> dict:
    import orbax.checkpoint as ocp
    path = os.path.abspath(os.path.join(directory, "params"))
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            meta = checkpointer.metadata(path)
        except Exception as e:  # Orbax raises many types for a damaged directory
            raise CheckpointError(f"could not read the Orbax params in {path}: {_first_line(e)}") from e
        saved = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        if saved is not None:
            _check_fits(saved, target, directory)
        try:
            return checkpointer.restore(path, target)
        except Exception as e:
            raise CheckpointError(f"could not read the Orbax params in {path}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def restore(directory: str | os.PathLike, dtype=None, param_dtype=None,
            sharding: ShardingSpec | None = None, verify: bool = True, **module_options) -> tuple[Any, dict]:
    """(module, params) from a checkpoint written by `save`; `sharding` as in `place_sharding`."""
    module = build_module(directory, dtype, param_dtype, **module_options)
    params = restore_params(directory, module, sharding, verify)
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


# ---------------------------------------------------------------------------------------------------------------
# the params of an interrupted training run (train/checkpointing.py: <output_dir>/checkpoints/<step>/{state,meta})
def latest_training_step(output_dir: str | os.PathLike) -> str | None:
    """The newest committed `<output_dir>/checkpoints/<step>` directory of a training run, or None."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [int(e) for e in os.listdir(root) if e.isdigit() and os.path.isdir(os.path.join(root, e, "state"))
             and any(os.path.isfile(os.path.join(root, e, m)) for m in ("_CHECKPOINT_METADATA", "commit_success.txt"))]
    return os.path.join(root, str(max(steps))) if steps else None


def restore_training(step_dir: str, dtype=None, param_dtype=None, sharding: ShardingSpec | None = None,
                     **module_options) -> tuple[Any, dict]:
    """(module, params) from a training checkpoint: the class and config its metadata names, params alone."""
    import orbax.checkpoint as ocp
    meta_path = os.path.join(step_dir, "meta", "metadata")
    try:
        with open(meta_path) as f:
            identity = json.load(f)["identity"]
        config_dict = dict(identity["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: cannot read the run's model identity (task, config): {e!r}") from e
    name = identity.get("architecture") or {"data2vec-audio": "Data2VecAudioModel",
                                            "data2vec-text": "Data2VecTextModel"}.get(config_dict.get("model_type"))
    if name not in registry.model_classes():
        raise CheckpointError(f"{meta_path}: names no Data2Vec class (architecture {name!r})")
    try:
        config = registry.config_class(name).from_dict(config_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: config: {e}") from e
    module = registry.model_class(name)(config=config, dtype=dtype or jnp.float32,
                                        param_dtype=param_dtype or jnp.float32, **module_options)
    state = os.path.join(step_dir, "state")
    with ocp.PyTreeCheckpointer() as checkpointer:
        try:
            tree = getattr(getattr(checkpointer.metadata(state), "item_metadata", None), "tree", None)
            host = host_sharding()
            target = {"params": jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), tree["params"])}
            restore_args = jax.tree_util.tree_map(lambda t: ocp.ArrayRestoreArgs(sharding=host), target)
            saved = checkpointer.restore(state, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))["params"]
        except Exception as e:
            raise CheckpointError(f"could not read the params of the training checkpoint {state}: "
                                  f"{_first_line(e)}") from e
    wanted = registry.abstract_params(module)
    saved = {k: v for k, v in unscan_params(saved).items() if k in wanted}  # e.g. a pre-training regression head
    _check_fits(saved, wanted, step_dir)
    check_finite_params(saved, step_dir)
    params = put(saved, module, sharding)
    return module, (scan_params(params) if module.scan_layers else params)
