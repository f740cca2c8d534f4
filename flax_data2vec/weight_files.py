"""Read transformers weight files into numpy: safetensors (no torch) and PyTorch pickles (torch, weights_only).

Every refusal is one line naming the file: pickles that call anything but tensor rebuilding, contents that are
not a state dict, files larger than the config's parameters can need (checked before any tensor is read, a
zip's uncompressed size included), and safetensors whose recorded digest (`integrity.TENSORS_DIGEST_KEY`, in
files this package wrote) does not match.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile

import jax
import numpy as np

from . import integrity, registry
from .integrity import CheckpointError


def read_state_dict(files: list[str], max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """{name: numpy array} from safetensors (no torch) or PyTorch pickles (torch, weights_only).

    max_bytes: refuse files whose tensors would take more (checked before any tensor is read).
    """
    out: dict[str, np.ndarray] = {}
    for path in files:
        if max_bytes is not None:
            _check_size(path, max_bytes)
        out.update(_read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path))
    return out


def tensor_bytes_cap(module) -> int:
    """The most bytes a weight file for `module` may expand to: its params in float64, twice, plus 64 MiB."""
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(registry.abstract_params(module)))
    return 16 * count + 64 * 2**20


def _check_size(path: str, max_bytes: int) -> None:
    """Refuse a file (or a zip's uncompressed members: a small .bin can expand hugely) larger than `max_bytes`."""
    size = os.path.getsize(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                size = max(size, sum(info.file_size for info in z.infolist()))
        except (zipfile.BadZipFile, OSError) as e:
            raise _corrupt(path, e) from e
    if size > max_bytes:
        raise CheckpointError(f"cannot read {path}: it holds {size / 2**20:.1f} MiB of data, more than the "
                              f"{max_bytes / 2**20:.1f} MiB the config's parameters can need; refused")


def _corrupt(path: str, e: Exception) -> CheckpointError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointError(f"cannot read {path}: it is corrupted or truncated ({reason}); delete it and fetch it again")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read, and check against the digest in its metadata where this package wrote it (`save_transformers`)."""
    import safetensors
    try:
        with safetensors.safe_open(path, framework="np") as f:
            want = (f.metadata() or {}).get(integrity.TENSORS_DIGEST_KEY)
    except Exception as e:
        raise _corrupt(path, e) from e
    arrays = _read_safetensors_arrays(path)
    if want is not None and integrity.tensors_digest(arrays) != want:
        raise CheckpointError(f"{path} fails its checksum (its metadata records {integrity.TENSORS_DIGEST_KEY} "
                              f"{want[:12]}...): it was damaged or changed after it was written")
    return arrays


def _read_safetensors_arrays(path: str) -> dict[str, np.ndarray]:
    import safetensors.numpy
    try:
        return safetensors.numpy.load_file(path)
    except TypeError:  # bfloat16 has no plain numpy dtype: read through jax (ml_dtypes) on the host
        import safetensors.flax
        try:
            with jax.default_device(jax.devices("cpu")[0]):
                return {k: np.asarray(v) for k, v in safetensors.flax.load_file(path).items()}
        except Exception as e:
            raise _corrupt(path, e) from e
    except Exception as e:  # SafetensorError, OSError, ...
        raise _corrupt(path, e) from e


def _refused_pickle(path: str, e: Exception) -> CheckpointError:
    """torch's weights_only refusal, said plainly (and without its advice to turn the protection off)."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f"calls `{m.group(1)}`" if m else "uses more than tensors and plain containers"
    return CheckpointError(f"cannot read {path}: refused: this file's pickle {what}, which is not allowed "
                           "(only tensors, numbers, strings and containers of them are loaded)")


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch pickle and reading it needs torch: `pip install torch` (CPU build: "
                          "`pip install torch --index-url https://download.pytorch.org/whl/cpu`), or convert the "
                          "checkpoint to safetensors") from e
    try:
        state_dict = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower() or "weightsunpickler" in str(e).lower():
            raise _refused_pickle(path, e) from None
        raise _corrupt(path, e) from e
    except Exception as e:
        raise _corrupt(path, e) from e
    if not isinstance(state_dict, dict):
        kind = type(state_dict).__name__
        raise CheckpointError(f"cannot read {path}: it holds {'an' if kind[0] in 'aeiou' else 'a'} {kind}, expected "
                              "a state dict (names -> tensors)")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"cannot read {path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state_dict.items()}
