"""Integrity of checkpoint files: SHA-256 manifests, content digests remembered by file identity, finite weights.

A manifest maps every file of a directory (relative path) to its size and SHA-256; `verify` checks a directory
against one, naming the first file missing, resized or changed. `content_digest` hashes a file once and
remembers the digest by (path, device, inode, size, mtime, ctime): any write changes the ctime, which no
user-space tool can set back (`cp -p`, `rsync -t` and tar restore the mtime only), so a remembered digest is
reused only for an unchanged file, and a changed one is hashed again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .publish import writer_token


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is damaged, or whose weights do not fit its config or the requested class."""


class IntegrityError(CheckpointError):
    """A file is missing, resized or changed since its checkpoint was written (the marker says otherwise)."""


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_all(paths: list[str]) -> list[str]:
    """SHA-256 of each file, several at a time (hashlib releases the GIL on large reads)."""
    if len(paths) < 2:
        return [file_sha256(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, paths))


def manifest(directory: str, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under `directory` except `exclude`."""
    rels = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        rels += [os.path.relpath(os.path.join(root, f), directory) for f in sorted(files)]
    rels = [r for r in rels if r not in exclude]
    digests = _hash_all([os.path.join(directory, r) for r in rels])
    return {r: {"size": os.path.getsize(os.path.join(directory, r)), "sha256": d} for r, d in zip(rels, digests)}


def check_listed_files(directory: str, files: dict, marker: str, hashes: bool = True) -> None:
    """CheckpointError naming the first file of `files` (a manifest) that is missing, resized or changed."""
    for rel, want in sorted(files.items()):
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise IntegrityError(f"{path} is missing: {marker} lists it as part of the checkpoint")
        size = os.path.getsize(path)
        if size != want["size"]:
            raise IntegrityError(f"{path} has {size} bytes, {marker} records {want['size']}: it was truncated "
                                  "or replaced after the checkpoint was written")
    if not hashes:
        return
    rels = sorted(files)
    for rel, digest in zip(rels, _hash_all([os.path.join(directory, r) for r in rels])):
        if digest != files[rel]["sha256"]:
            raise IntegrityError(f"{os.path.join(directory, rel)} fails its checksum (sha256 {digest[:12]}..., "
                                  f"{marker} records {files[rel]['sha256'][:12]}...): it was damaged or changed "
                                  "after the checkpoint was written")


def content_digest(path: str, memo_dir: str) -> str:
    """SHA-256 of `path`, hashed only when its identity (inode, size, mtime, ctime) is new to `memo_dir`."""
    real = os.path.realpath(path)
    st = os.stat(real)
    identity = [real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    memo = os.path.join(memo_dir, hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    try:
        with open(memo) as f:
            saved = json.load(f)
        if saved["identity"] == identity:
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = file_sha256(real)
    try:
        os.makedirs(memo_dir, exist_ok=True)
        tmp = f"{memo}.tmp-{writer_token()}"
        with open(tmp, "w") as f:
            json.dump({"identity": identity, "sha256": digest}, f)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest


def check_finite_arrays(arrays: dict[str, np.ndarray], label: str) -> None:
    """CheckpointError naming the first float array (of a host state dict) holding NaN or inf."""
    for name, value in arrays.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.inexact) or value.dtype.name == "bfloat16":
            bad = ~np.isfinite(value.astype(np.float32) if value.dtype.name == "bfloat16" else value)
            if bad.any():
                raise CheckpointError(f"{label}: parameter {name} holds {int(bad.sum())} non-finite values "
                                      "(NaN or inf); refusing it")


@jax.jit
def _all_finite(tree):
    return jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                                  else jnp.bool_(True), tree)


def check_finite_params(params: dict, label: str) -> None:
    """CheckpointError naming the first param (device or host arrays, any sharding) holding NaN or inf."""
    flat = traverse_util.flatten_dict(params, sep="/")
    ok = jax.device_get(_all_finite(flat))
    for path in sorted(flat):
        if not bool(ok[path]):
            count = int(jax.device_get(jnp.sum(~jnp.isfinite(flat[path]))))
            raise CheckpointError(f"{label}: parameter {path} holds {count} non-finite values (NaN or inf); "
                                  "refusing it")


def safe_relative_path(name: object, index: str) -> str:
    """A shard name from an index, refused unless it stays inside the index's directory."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name or "\0" in name:
        raise CheckpointError(f"{index}: shard name {name!r} must be a relative file name inside the checkpoint "
                              "directory")
    if os.path.normpath(name).split(os.sep)[0] == "..":
        raise CheckpointError(f"{index}: shard name {name!r} points outside the checkpoint directory; refused")
    return name


TENSORS_DIGEST_KEY = "flax_data2vec_sha256"  # in the safetensors header metadata of files this package writes


def tensors_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor in name order: independent of the file layout."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, value.dtype.str, list(value.shape)]).encode())
        h.update(memoryview(value).cast("B"))
    return h.hexdigest()


def check_hub_blob(path: str) -> None:
    """A huggingface_hub cache file stored under its SHA-256 (LFS weights) must hash to its name."""
    blob = os.path.basename(os.path.realpath(path))
    if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob) and file_sha256(path) != blob:
        raise CheckpointError(f"{path} fails its checksum (the hub cache stores it as sha256 {blob[:12]}...): it was "
                              "damaged after the download; delete it and fetch it again")
