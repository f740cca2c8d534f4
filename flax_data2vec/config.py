"""Frozen, hashable configs that read and write transformers' Data2Vec `config.json` files.

Field names and defaults are those of `transformers.Data2VecAudioConfig` / `Data2VecTextConfig`,
so a checkpoint's config round-trips unchanged. Keys this package does not model are kept in
`extra` and written back by `to_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, ClassVar, Mapping

MAX_VOCAB = 2**24  # larger than any real vocabulary; guards against e.g. 10**12 before anything is allocated
MAX_SIZE = 2**20  # widths, depths, kernels, positions
_POSITIVE = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size", "type_vocab_size",
    "max_position_embeddings", "num_conv_pos_embedding_groups", "conv_pos_kernel_size", "num_conv_pos_embeddings",
    "mask_time_length", "mask_feature_length", "classifier_proj_size", "xvector_output_dim", "adapter_kernel_size",
    "adapter_stride", "num_adapter_layers", "output_hidden_size", "conv_dim", "conv_stride", "conv_kernel",
    "tdnn_dim", "tdnn_kernel", "tdnn_dilation"})
_PROBABILITIES = frozenset({
    "hidden_dropout", "activation_dropout", "attention_dropout", "feat_proj_dropout", "final_dropout", "layerdrop",
    "mask_time_prob", "mask_feature_prob", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "classifier_dropout"})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_field(name: str, annotation: str, value: Any) -> None:
    """TypeError/ValueError naming the field when `value` is not of its declared type and range."""
    if value is None and annotation.endswith("| None"):
        return
    base = annotation.replace(" | None", "")
    shown = f"{value!r} ({type(value).__name__})"
    if base == "bool" and not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {shown}")
    if base == "str" and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {shown}")
    if base == "float":
        if not _is_real(value):
            raise TypeError(f"{name} must be a finite number, got {shown}")
        if name in _PROBABILITIES and not 0 <= value <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if name == "layer_norm_eps" and not value > 0:
            raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        if name == "initializer_range" and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if base.startswith("tuple[") and base.endswith(", ...]"):
        item = base[len("tuple["):-len(", ...]")]
        if not isinstance(value, tuple) or not value:
            raise TypeError(f"{name} must be a non-empty list of {item}, got {shown}")
        for i, v in enumerate(value):
            _check_field(f"{name}[{i}]", item, v)
        return
    if base == "int":
        if not _is_int(value):
            raise TypeError(f"{name} must be an integer, got {shown}")
        limit = MAX_VOCAB if name.split("[")[0] in ("vocab_size", "type_vocab_size") else MAX_SIZE
        if name.split("[")[0] in _POSITIVE and not 0 < value <= limit:
            raise ValueError(f"{name} must be a positive integer <= {limit}, got {value}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


# Keys transformers adds to every config.json that carry no architecture information.
_BOOKKEEPING_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "return_dict", "output_attentions", "output_hidden_states",
     "dtype", "torch_dtype", "is_encoder_decoder", "chunk_size_feed_forward", "num_labels",
     "num_feat_extract_layers", "model_type"}
)


def _freeze(value: Any) -> Any:
    """Lists (from JSON) become tuples so that configs stay hashable."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _class_id(key: Any) -> int:
    try:
        if isinstance(key, bool) or not (_is_int(key) or isinstance(key, str)):
            raise ValueError
        value = int(key)
    except ValueError:
        raise ValueError(f"id2label keys must be integer class ids, got {key!r}") from None
    if value < 0:
        raise ValueError(f"id2label keys must be >= 0, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Behaviour shared by both configs: labels, dict round trip, validation hooks."""

    model_type: ClassVar[str] = ""

    id2label: tuple[tuple[int, str], ...] = ((0, "LABEL_0"), (1, "LABEL_1"))
    problem_type: str | None = None
    architectures: tuple[str, ...] | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "id2label" and isinstance(value, Mapping):
                value = tuple(sorted((_class_id(k), str(v)) for k, v in value.items()))
            elif f.name == "extra" and isinstance(value, Mapping):
                value = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in value.items()))
            else:
                value = _freeze(value)
            object.__setattr__(self, f.name, value)
            if f.name not in ("id2label", "extra"):
                _check_field(f.name, f.type, value)
        if self.problem_type not in (None, "regression", "single_label_classification",
                                     "multi_label_classification"):
            raise ValueError(f"problem_type must be regression, single_label_classification or "
                             f"multi_label_classification, got {self.problem_type!r}")
        self.validate()

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act: only 'gelu' (exact erf GELU, as in the checkpoints) is supported, "
                             f"got {self.hidden_act!r}")

    # -- labels ---------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "ConfigBase":
        """A copy with fields changed; `num_labels=N` is accepted and rewrites `id2label`."""
        if "num_labels" in changes:
            n = changes.pop("num_labels")
            changes.setdefault("id2label", tuple((i, f"LABEL_{i}") for i in range(n)))
        return dataclasses.replace(self, **changes)

    # -- dict / json ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides) -> "ConfigBase":
        """Build from a transformers config dict; unknown keys go to `extra`, never an error."""
        if not isinstance(d, Mapping):
            raise TypeError(f"a config must be a JSON object of fields, got a {type(d).__name__}")
        d = dict(d)
        d.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, extra = {}, {}
        if "num_labels" in d and "id2label" not in d:
            n = d["num_labels"]
            if not _is_int(n) or not 0 < n <= MAX_VOCAB:
                raise ValueError(f"num_labels must be a positive integer <= {MAX_VOCAB}, got {n!r}")
            d["id2label"] = {i: f"LABEL_{i}" for i in range(n)}
        for key, value in d.items():
            if key in names and key != "extra":
                kwargs[key] = value
            elif key not in _BOOKKEEPING_KEYS and key != "label2id":
                extra[key] = value
        model_type = d.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ValueError(f"config.json has model_type {model_type!r}; {cls.__name__} expects {cls.model_type!r}")
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """A transformers-compatible config dict (what `config.json` holds)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "id2label":
                out["id2label"] = {str(k): v for k, v in value}
                out["label2id"] = {v: k for k, v in value}
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update({k: json.loads(v) for k, v in self.extra})
        out["model_type"] = self.model_type
        return out

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "ConfigBase":
        """Read `config.json` from a directory or a file path."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f), **overrides)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Data2VecAudioConfig(ConfigBase):
    """Config of the Data2Vec audio encoder and its heads (transformers' `Data2VecAudioConfig`)."""

    model_type: ClassVar[str] = "data2vec-audio"

    vocab_size: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    final_dropout: float = 0.1
    layerdrop: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embedding_groups: int = 16
    conv_pos_kernel_size: int = 19
    num_conv_pos_embeddings: int = 5
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    ctc_loss_reduction: str = "sum"
    ctc_zero_infinity: bool = False
    use_weighted_layer_sum: bool = False
    classifier_proj_size: int = 256
    tdnn_dim: tuple[int, ...] = (512, 512, 512, 512, 1500)
    tdnn_kernel: tuple[int, ...] = (5, 3, 3, 1, 1)
    tdnn_dilation: tuple[int, ...] = (1, 2, 3, 1, 1)
    xvector_output_dim: int = 512
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 3
    output_hidden_size: int | None = None
    apply_spec_augment: bool = True

    def validate(self) -> None:
        super().validate()
        n = len(self.conv_dim)
        for name in ("conv_stride", "conv_kernel"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but conv_dim has {n}: "
                                 "conv_dim, conv_stride and conv_kernel must have the same length")
        for name in ("tdnn_kernel", "tdnn_dilation"):
            if len(getattr(self, name)) != len(self.tdnn_dim):
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but tdnn_dim has "
                                 f"{len(self.tdnn_dim)}: they must have the same length")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_conv_pos_embedding_groups ({self.num_conv_pos_embedding_groups})")
        if self.feat_extract_activation != "gelu":
            raise ValueError(f"feat_extract_activation: only 'gelu' is supported, got {self.feat_extract_activation!r}")
        if self.ctc_loss_reduction not in ("sum", "mean"):
            raise ValueError(f"ctc_loss_reduction must be 'sum' or 'mean', got {self.ctc_loss_reduction!r}")

    @property
    def num_feat_extract_layers(self) -> int:
        return len(self.conv_dim)

    @property
    def inputs_to_logits_ratio(self) -> int:
        return math.prod(self.conv_stride)

    @property
    def adapter_hidden_size(self) -> int:
        """Width after the optional adapter (`output_hidden_size`, defaulting to `hidden_size`)."""
        return self.output_hidden_size or self.hidden_size

    @property
    def receptive_field(self) -> int:
        """Fewest samples that give one feature frame (400 at the default conv stack)."""
        field = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            field = (field - 1) * s + k
        return field


@dataclasses.dataclass(frozen=True)
class Data2VecTextConfig(ConfigBase):
    """Config of the Data2Vec text encoder and its heads (transformers' `Data2VecTextConfig`)."""

    model_type: ClassVar[str] = "data2vec-text"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    use_cache: bool = True
    classifier_dropout: float | None = None
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True

    def validate(self) -> None:
        super().validate()
        if self.add_cross_attention and not self.is_decoder:
            raise ValueError("add_cross_attention=True requires is_decoder=True")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must lie in [0, vocab_size={self.vocab_size})")

    @property
    def max_sequence_length(self) -> int:
        """Longest input the learned positions cover (RoBERTa offsets positions by pad_token_id + 1)."""
        return self.max_position_embeddings - (self.pad_token_id or 0) - 1
