"""Load Data2Vec models by short name, hub repo id or local path; read and write transformers checkpoints.

`load(name_or_path)` accepts
  - a short name from `SHORT_NAMES` (`data2vec-audio-base-960h` -> hub repo `facebook/data2vec-audio-base-960h`);
  - a hub repo id, fetched with huggingface_hub (its cache, `HF_HOME`, `HF_HUB_OFFLINE` and token apply);
    only config.json and the weight files are downloaded;
  - a local transformers directory: config.json + model.safetensors, sharded safetensors with
    model.safetensors.index.json, or pytorch_model.bin (reading .bin needs torch; safetensors does not);
  - an Orbax checkpoint written by `flax_data2vec.save` or `convert/pytorch_to_orbax.py`.

Conversion cache: the first load of a PyTorch-format checkpoint writes an Orbax checkpoint (config.json
beside it) under `$FLAX_DATA2VEC_CACHE` (default `~/.cache/flax_data2vec`), keyed by the source (repo id +
commit hash, or the SHA-256 of a local directory's config.json and weight files, remembered by file identity
in `.digests/`) and the class loaded. Later loads read that and never import torch. One process converts
while others wanting the same entry wait on its lock file (`.locks/<entry>.lock`); entries are published whole
(`publish.atomic_directory`) with a marker listing every file's checksum, checked on each load; an entry that
fails the check is converted again. Delete the folder to clear the cache.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import socket
import urllib.parse
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from . import checkpoint, integrity, publish, registry
from .checkpoint import save  # noqa: F401 - re-exported as flax_data2vec.save
from .integrity import CheckpointError
from .names import REPO_ID, SHORT_NAMES
from .weight_files import read_state_dict, tensor_bytes_cap
from .weights import from_state_dict, merge_encoder, scan_params

CACHE_ENV = "FLAX_DATA2VEC_CACHE"
# looked for in this order; an index names the shards
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
BASE_CLASSES = {"data2vec-audio": "Data2VecAudioModel", "data2vec-text": "Data2VecTextModel",  # by model_type
                "data2vec2-audio": "Data2Vec2AudioModel", "data2vec2-text": "Data2Vec2TextModel"}


def cache_dir() -> str:
    """Where converted checkpoints are kept: `$FLAX_DATA2VEC_CACHE`, else `~/.cache/flax_data2vec`."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "flax_data2vec"))


@dataclasses.dataclass
class Source:
    """A resolved checkpoint: its local config directory, how to get its weight files, and its identity."""

    label: str  # what the user asked for, for messages
    kind: str  # "orbax", "transformers", or "training" (an interrupted run's latest checkpoint)
    directory: str  # local directory holding config.json
    identify: Callable[[], str] | None = None  # -> a key that changes whenever the weights change (cache key)
    fetch: Callable[[], list[str]] | None = None  # -> local weight-file paths, downloading them if needed

    @functools.cached_property
    def key(self) -> str:
        """Computed on first use only: for a local directory it hashes the files (once per file identity)."""
        return self.identify() if self.identify else ""


# ---------------------------------------------------------------------------------------------------------------
# resolution
def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Source:
    """Short name, hub repo id or local directory -> Source. Raises with a suggestion for unknown names."""
    name = os.fspath(name_or_path)
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):
        return _local_source(path)
    if name in SHORT_NAMES:
        return _hub_source(SHORT_NAMES[name], revision, label=name)
    if REPO_ID.fullmatch(name) and not os.path.lexists(path):
        return _hub_source(name, revision)
    if os.sep in name or name.startswith((".", "~")) or os.path.lexists(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    close = difflib.get_close_matches(name, list(SHORT_NAMES), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "."
    raise ValueError(f"unknown model name {name!r}{hint} Known names: {', '.join(SHORT_NAMES)}; "
                     "or give a hub repo id (owner/name) or a local directory")


def training_output_model(path: str) -> str:
    """A `train_tpu.py` output directory stands for the final model it wrote to `<dir>/model`."""
    inner = os.path.join(path, "model")
    if not checkpoint.is_checkpoint(path) and checkpoint.is_checkpoint(inner):
        return inner
    return path


def _local_source(path: str) -> Source:
    path = training_output_model(path)
    if checkpoint.is_checkpoint(path):
        return Source(path, "orbax", path)
    step = checkpoint.latest_training_step(path)
    if step is not None:
        return Source(path, "training", step)
    config = os.path.join(path, "config.json")
    if os.path.isdir(os.path.join(path, "params")):
        raise FileNotFoundError(f"{path} is an incomplete flax_data2vec checkpoint (no {checkpoint.MARKER}); "
                                "was its write interrupted?")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{path} has no config.json: it is neither a transformers nor a flax_data2vec "
                                "checkpoint")
    files = local_weight_files(path)

    def identify() -> str:
        memo = os.path.join(cache_dir(), ".digests")
        return json.dumps(["local", [(os.path.relpath(f, path), integrity.content_digest(f, memo))
                                     for f in [config, *files]]])
    return Source(path, "transformers", path, identify, fetch=lambda: files)


def _index_shards(index_path: str) -> list[str]:
    """The shard file names an index lists, each refused unless it stays inside the index's directory."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"cannot read the shard index {index_path}: expected an object with a `weight_map` "
                              f"of tensor name -> shard file ({e!r})") from e
    return sorted(integrity.safe_relative_path(n, index_path) for n in names)


def local_weight_files(directory: str) -> list[str]:
    """The weight files of a transformers directory (all shards of a sharded one), safetensors first."""
    for fname in WEIGHT_FILES:
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            continue
        if not fname.endswith(".index.json"):
            return [path]
        shards = _index_shards(path)
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise FileNotFoundError(f"{path} names shards that are missing: {', '.join(missing)}")
        return [os.path.join(directory, s) for s in shards]
    raise FileNotFoundError(f"{directory} has config.json but no weights: looked for {', '.join(WEIGHT_FILES)}")


def _hub_source(repo_id: str, revision: str | None, label: str | None = None) -> Source:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    where = repo_id + (f"@{revision}" if revision else "")
    offline_reason = hub_unreachable()  # then only the cache is read: no retries against a dead network
    local_only = offline_reason is not None
    try:
        config = hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=local_only)
    except Exception as e:  # offline, missing repo, gated, bad id: all mean "cannot get it"
        raise FileNotFoundError(_hub_error(where, offline_reason, e)) from e
    directory = os.path.dirname(config)
    snapshot = os.path.basename(directory) if os.path.basename(os.path.dirname(directory)) == "snapshots" else None
    commit = snapshot or revision or "main"

    def fetch() -> list[str]:
        for fname in WEIGHT_FILES:
            try:
                path = hf_hub_download(repo_id, fname, revision=commit, local_files_only=local_only)
            except EntryNotFoundError:  # the LocalEntryNotFoundError of an uncached file is one too
                if local_only and fname == WEIGHT_FILES[-1]:
                    raise FileNotFoundError(_hub_error(f"{repo_id} ({commit})", offline_reason, None)) from None
                continue
            files = [path] if not fname.endswith(".index.json") else [
                hf_hub_download(repo_id, shard, revision=commit, local_files_only=local_only)
                for shard in _index_shards(path)]
            for f in files:
                integrity.check_hub_blob(f)
            return files
        raise FileNotFoundError(f"hub repo {repo_id} ({commit}) has no weights: looked for {', '.join(WEIGHT_FILES)}")
    return Source(label or repo_id, "transformers", directory, lambda: json.dumps(["hub", repo_id, commit]), fetch)


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be used now (HF_HUB_OFFLINE, or one connection attempt to its endpoint failing), else
    None. Behind a proxy (HTTP(S)_PROXY / ALL_PROXY) no probe is made: the library's own attempt decides."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return None
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        return f"the hub ({constants.ENDPOINT}) cannot be reached: {e.strerror or e}"
    return None


def _hub_error(where: str, offline_reason: str | None, error: Exception | None) -> str:
    """One line: what could not be had, why, and the ways out (the cache, HF_HUB_OFFLINE, a local directory)."""
    from huggingface_hub import constants
    if offline_reason is not None:
        return (f"cannot get hub repo {where}: {offline_reason}, and it is not in the hub cache "
                f"({constants.HF_HUB_CACHE}). Download it once with network (then HF_HUB_OFFLINE=1 reads the cache "
                "without trying the network), or give a local directory")
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"cannot get config.json of hub repo {where}: {reason}"


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, expected an object of config fields")
    return config


def choose_architecture(config: dict, requested: str | None, label: str) -> str:
    """`requested`, else the first Data2Vec class in config.json's `architectures`, else the base class."""
    classes = {**registry.model_classes(), **registry.data2vec2_classes()}
    model_type = config.get("model_type")
    if requested is not None:
        if requested not in classes:
            close = difflib.get_close_matches(requested, list(classes), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"unknown architecture {requested!r}{hint} Known: {', '.join(classes)}")
        name = requested
    else:
        listed = config.get("architectures") or []
        known = [a for a in listed if a in classes]
        if known:
            name = known[0]
        elif listed or model_type not in BASE_CLASSES:
            raise ValueError(f"{label}: config.json names no Data2Vec audio/text class (architectures {listed}, "
                             f"model_type {model_type!r}); pass architecture= one of {', '.join(classes)}")
        else:
            name = BASE_CLASSES[model_type]
    wanted = registry.config_class(name).model_type
    if model_type is not None and model_type != wanted:
        raise ValueError(f"{label}: config.json has model_type {model_type!r}, but {name} needs {wanted!r}")
    return name


# ---------------------------------------------------------------------------------------------------------------
# state dict -> params of any class, base <-> head
def _listing(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def params_for(module, state_dict: dict, label: str = "the checkpoint") -> tuple[dict, dict]:
    """Host (numpy) params of `module`, unrolled, from a transformers state dict with or without the prefix.

    Head params absent from a base checkpoint are left at zero for `checkpoint.init_new` to fill; head entries
    the class has no use for are dropped. Both are reported in the returned info ({"new", "new_paths",
    "dropped"}); encoder params missing or left over, and shape mismatches, raise CheckpointError.
    """
    name = type(module).__name__
    prefix = registry.base_prefix(name) + "."
    is_base = name in BASE_CLASSES.values()
    if any(k.startswith(prefix) for k in state_dict):
        encoder = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        head = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    else:
        encoder, head = dict(state_dict), {}
    if is_base:
        state_dict, dropped = encoder, sorted(head)
    else:
        state_dict, dropped = {**{prefix + k: v for k, v in encoder.items()}, **head}, []

    def is_head(key: str) -> bool:  # the pooler is only in some text checkpoints: treat it as part of a head
        if is_base:
            return key.startswith("pooler.")
        return not key.startswith(prefix) or key.startswith(prefix + "pooler.")
    try:
        shapes = registry.abstract_params(module)
    except ValueError as e:
        raise CheckpointError(f"{label}: config.json does not suit {name}: {e}") from e
    try:
        params, report = from_state_dict(state_dict, shapes, registry.weight_table(name, module.config))
    except ValueError as e:
        raise CheckpointError(f"{label} does not fit its config: {e}") from e
    missing = [k for k in report.missing if not is_head(k)]
    unexpected = [k for k in report.unexpected if not is_head(k)]
    if missing or unexpected:
        parts = [f"{len(missing)} parameters of {name} are missing: {_listing(missing)}"] if missing else []
        parts += [f"{len(unexpected)} entries are unexpected: {_listing(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{label} does not fit {name}: " + "; ".join(parts))
    flat = traverse_util.flatten_dict(params, sep="/")
    new_paths = sorted(p for p, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct))
    flat.update({p: np.zeros(flat[p].shape, flat[p].dtype) for p in new_paths})
    info = {"new": [k for k in report.missing if is_head(k)], "new_paths": new_paths,
            "dropped": sorted(dropped + [k for k in report.unexpected if is_head(k)])}
    return traverse_util.unflatten_dict(flat, sep="/"), info


def warn_changes(name: str, label: str, info: dict) -> None:
    if info["new"]:
        warnings.warn(f"{name}: {len(info['new'])} parameters are not in {label} and were newly initialised: "
                      f"{_listing(info['new'])}", stacklevel=3)
    if info["dropped"]:
        warnings.warn(f"{name}: dropped {len(info['dropped'])} entries of {label} that it has no use for: "
                      f"{_listing(info['dropped'])}", stacklevel=3)


def _convert(source: Source, name: str, options: dict) -> tuple[Any, dict, dict]:
    """(float32 module, host params with new ones zero, info) for class `name` from a transformers source."""
    try:
        config = registry.config_class(name).from_dict(read_config(source.directory))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(source.label, 'config.json')}: {e}") from e
    module = registry.model_class(name)(config=config.replace(architectures=(name,)), **options)
    state_dict = read_state_dict(source.fetch(), tensor_bytes_cap(module))
    integrity.check_finite_arrays(state_dict, source.label)
    params, info = params_for(module, state_dict, source.label)
    return module, params, info


def cache_entry(source: Source, name: str, options: dict, convert: Callable | None = None) -> str:
    """The converted Orbax checkpoint of (source, class), converting on first use with `convert`.

    Holding `.locks/<entry>.lock` while converting makes one process (of a pod sharing the cache, or of one host)
    convert and the others wait, then read what it published.
    """
    digest = hashlib.sha256(json.dumps([source.key, name, options], sort_keys=True, default=str).encode())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", source.label.strip("/"))[-48:]
    entry = os.path.join(cache_dir(), f"{slug}--{name}-{digest.hexdigest()[:16]}")
    if _usable(entry):
        return entry
    with publish.exclusive(os.path.join(cache_dir(), ".locks", os.path.basename(entry) + ".lock")):
        if _usable(entry):  # converted by whoever held the lock before
            return entry
        module, params, info = (convert or _convert)(source, name, options)
        checkpoint.save(entry, module, params, overwrite=os.path.lexists(entry),
                        metadata={"source": source.key, **info})
    return entry


def _usable(entry: str) -> bool:
    """A complete cache entry of this version: a valid marker whose files are all there at their sizes."""
    if not checkpoint.is_checkpoint(entry):
        return False
    try:
        info = checkpoint.read_metadata(entry)
        if info["format_version"] != checkpoint.FORMAT_VERSION:
            return False
        checkpoint.check_files(entry, verify=False)
        return True
    except (OSError, ValueError) as e:
        warnings.warn(f"cache entry {entry} is damaged and is converted again: {e}", stacklevel=4)
        return False


def load(name_or_path: str | os.PathLike, architecture: str | None = None, dtype=None, param_dtype=None,
         sharding: checkpoint.ShardingSpec | None = None, *, rng: int | jax.Array = 0, revision: str | None = None,
         **module_options) -> tuple[Any, dict]:
    """(module, params) of a Data2Vec checkpoint named by short name, hub repo id or local path.

    architecture: one of the twelve class names; default: config.json's `architectures`. A base checkpoint
      loaded into a head class gets a head initialised from `rng` (warned); a head checkpoint loaded into a
      base class loses its head (warned).
    dtype: compute dtype of the module; param_dtype: dtype the params are cast to (both default float32).
    sharding: a jax.sharding.Sharding for every param, or a function (path, shape) -> Sharding, path being
      the key tuple in the unrolled layer layout; each array is read straight into its shards.
    revision: hub branch, tag or commit. module_options: further module fields (scan_layers, remat, ...).
    A fairseq `.pt` file is read by `fairseq.load` (which also takes `weights="teacher"`).
    """
    if os.fspath(name_or_path).endswith(".pt"):
        from . import fairseq
        return fairseq.load(name_or_path, architecture, dtype, param_dtype, sharding, rng=rng, **module_options)
    source = resolve(name_or_path, revision)
    if source.kind == "training":
        if architecture not in (None, _training_architecture(source)):
            raise ValueError(f"{source.label} is an interrupted training run: it loads only as the class it trained")
        warnings.warn(f"{source.label} has no final model yet (no {os.path.join(source.label, 'model')}): loading "
                      f"the params of its latest training checkpoint, {source.directory}", stacklevel=2)
        return checkpoint.restore_training(source.directory, dtype, param_dtype, sharding, **module_options)
    if source.kind == "orbax":
        stored = checkpoint.read_metadata(source.directory)["architecture"]
        if architecture in (None, stored):
            return checkpoint.restore(source.directory, dtype, param_dtype, sharding, **module_options)
        return _orbax_as(source, architecture, dtype, param_dtype, sharding, rng, module_options)
    name = choose_architecture(read_config(source.directory), architecture, source.label)
    options = {k: v for k, v in module_options.items() if k not in checkpoint.SPEED_OPTIONS}
    return load_entry(lambda: cache_entry(source, name, options), source.label, dtype, param_dtype, sharding, rng,
                      module_options)


def load_entry(make_entry: Callable[[], str], label: str, dtype, param_dtype, sharding, rng,
               module_options: dict) -> tuple[Any, dict]:
    """(module, params) from a conversion-cache entry (`make_entry` finds or converts it): restore, initialise new
    head params, warn what changed. An entry damaged since it was written is converted again."""
    entry = make_entry()
    info = checkpoint.read_metadata(entry)
    module = checkpoint.build_module(entry, dtype, param_dtype, **module_options)
    try:
        params = checkpoint.restore_params(entry, module, sharding)
    except integrity.IntegrityError as e:  # damaged since it was written: the source is at hand, convert again
        warnings.warn(f"cache entry {entry} failed its check and is converted again: {e}", stacklevel=2)
        publish.remove_tree(os.path.join(entry, checkpoint.MARKER))
        entry = make_entry()
        params = checkpoint.restore_params(entry, module, sharding)
    params = checkpoint.init_new(module, params, info["new_paths"], rng, sharding)
    warn_changes(info["architecture"], label, info)
    return module, (scan_params(params) if module.scan_layers else params)


def _training_architecture(source: Source) -> str | None:
    with open(os.path.join(source.directory, "meta", "metadata")) as f:
        return json.load(f).get("identity", {}).get("architecture")


def _orbax_as(source: Source, name: str, dtype, param_dtype, sharding, rng, module_options) -> tuple[Any, dict]:
    """An Orbax checkpoint of one class loaded as another: its encoder merged into class `name` in Flax space."""
    stored = checkpoint.build_module(source.directory)
    choose_architecture(stored.config.to_dict(), name, source.label)
    params = checkpoint.restore_params(source.directory, stored, checkpoint.host_sharding())
    cls = registry.model_class(name)
    module = cls(config=stored.config.replace(architectures=(name,)), dtype=dtype or np.float32,
                 param_dtype=param_dtype or np.float32, **module_options)
    try:
        merged, report = merge_encoder(registry.abstract_params(module), params, registry.encoder_prefix(name),
                                       registry.encoder_prefix(type(stored).__name__))
    except ValueError as e:
        raise CheckpointError(f"{source.label} does not fit {name}: {e}") from e
    flat = traverse_util.flatten_dict(merged, sep="/")
    flat = {p: (np.zeros(v.shape, v.dtype) if isinstance(v, jax.ShapeDtypeStruct) else v) for p, v in flat.items()}
    warn_changes(name, source.label, {"new": report.new, "dropped": report.dropped})
    params = checkpoint.put(traverse_util.unflatten_dict(flat, sep="/"), module, sharding)
    params = checkpoint.init_new(module, params, report.new, rng, sharding)
    return module, (scan_params(params) if module.scan_layers else params)


# ---------------------------------------------------------------------------------------------------------------
# conversion both ways (the convert/ scripts)
def convert_to_orbax(src: str, dst: str, architecture: str | None = None, overwrite: bool = False,
                     revision: str | None = None, rng: int = 0) -> str:
    """A transformers checkpoint (short name, hub id, local dir) -> an Orbax checkpoint at `dst`."""
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(dst)} already exists; pass --overwrite to replace it")
    source = resolve(src, revision)
    if source.kind == "orbax":
        raise ValueError(f"{source.directory} is already a flax_data2vec Orbax checkpoint")
    name = choose_architecture(read_config(source.directory), architecture, source.label)
    module, params, info = _convert(source, name, {})
    warn_changes(name, source.label, info)
    params = checkpoint.init_new(module, params, info["new_paths"], rng, checkpoint.host_sharding())
    from .processors import copy_processor_files  # the tokenizer / feature extractor travel along
    return checkpoint.save(dst, module, params, overwrite, metadata={"source": source.directory},
                           assets=lambda tmp: copy_processor_files(source.directory, tmp))


def save_transformers(directory: str, module, params, overwrite: bool = False,
                      assets: Callable[[str], None] | None = None) -> str:
    """Write config.json + model.safetensors that transformers' `from_pretrained` loads without warnings.

    Tied copies (the LM heads' decoder) are left out, as `save_pretrained` does; transformers re-ties them.
    assets(tmp_dir): writes the processor files before the directory is published.
    """
    name = type(module).__name__
    state_dict = registry.to_transformers_state_dict(module, params)
    for key in registry.weight_table(name, module.config).tied:
        state_dict.pop(key, None)
    # numpy-safetensors has no bfloat16: such params (param_dtype=bfloat16) are written as float32
    state_dict = {k: (v.astype(np.float32) if v.dtype.name == "bfloat16" else v) for k, v in state_dict.items()}
    integrity.check_finite_arrays(state_dict, f"refusing to write {os.path.abspath(directory)}")
    digest = integrity.tensors_digest(state_dict)
    import safetensors.numpy
    with checkpoint.atomic_directory(directory, overwrite) as tmp:
        module.config.replace(architectures=(name,)).to_json_file(os.path.join(tmp, "config.json"))
        if assets is not None:  # first: a missing tokenizer fails before the weights are written
            assets(tmp)
        safetensors.numpy.save_file(state_dict, os.path.join(tmp, "model.safetensors"),
                                    metadata={"format": "pt", integrity.TENSORS_DIGEST_KEY: digest})
    return os.path.abspath(directory)


def convert_to_transformers(src: str, dst: str, overwrite: bool = False, weights_only: bool = False) -> str:
    """An Orbax checkpoint written by this package -> a transformers directory at `dst`, with the processor
    files `transformers.pipeline` needs (an error if the tokenizer is missing, unless `weights_only`)."""
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(dst)} already exists; pass --overwrite to replace it")
    src = training_output_model(os.fspath(src))
    if not os.path.lexists(src):
        raise FileNotFoundError(f"{os.path.abspath(src)} does not exist")
    if not checkpoint.is_checkpoint(src):
        raise FileNotFoundError(f"{os.path.abspath(src)} is not a flax_data2vec Orbax checkpoint "
                                f"(no {checkpoint.MARKER})")
    module, params = checkpoint.restore(src, sharding=checkpoint.host_sharding())
    from . import processors

    def assets(tmp: str) -> None:  # the tokenizer / feature extractor travel along, checked before publishing
        processors.copy_processor_files(src, tmp)
        if not weights_only:
            processors.complete_processors(tmp, module, label=os.path.abspath(src))
    return save_transformers(dst, module, params, overwrite, assets=assets)
