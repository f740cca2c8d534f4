"""Frozen configs of the data2vec 2.0 speech and text encoders, under fairseq's field names.

Fields are those of fairseq's `Data2VecMultiConfig` (data2vec2.py) and its modality configs
(`D2vAudioConfig`, `D2vTextConfig`) that change the encoder at inference. Defaults are the released base
models' values (`config/v2/base_{audio,text}_only_task.yaml`, REFERENCE.md §5.3 / §5.5.3); where fairseq's
dataclass default differs, the comment says so. `to_dict` / `from_dict` round-trip through config.json
(model_type `data2vec2-audio` / `data2vec2-text`), so converted checkpoints restore like v1 ones.
"""

from __future__ import annotations

import dataclasses
import math

from .config import ConfigBase, Data2VecAudioConfig, Data2VecTextConfig

# [(dim, kernel, stride)] of the wav2vec 2.0 CNN: D2vAudioConfig.feature_encoder_spec (REFERENCE.md §5.5.3)
BASE_FEATURE_ENCODER = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


@dataclasses.dataclass(frozen=True)
class _Data2Vec2Config(ConfigBase):
    """The transformer fields shared by both modalities (`Data2VecMultiConfig`)."""

    depth: int = 12  # base yaml
    embed_dim: int = 768  # base yaml
    num_heads: int = 12  # base yaml
    mlp_ratio: float = 4.0  # Data2VecMultiConfig default, base yaml
    layer_norm_first: bool = False  # base yaml: post-LN blocks (AltBlock)
    norm_eps: float = 1e-5  # base yaml; Data2VecMultiConfig's default is 1e-6
    norm_affine: bool = True  # Data2VecMultiConfig default
    encoder_dropout: float = 0.1  # base yaml: attention output (proj) dropout
    attention_dropout: float = 0.1  # base yaml: attention-probability dropout
    activation_dropout: float = 0.0  # base yaml: dropout inside the MLP (timm Mlp drop)
    post_mlp_drop: float = 0.1  # base yaml: dropout on the MLP output
    dropout_input: float = 0.0  # base yaml: dropout before the blocks
    layerdrop: float = 0.0  # text base yaml 0; audio base yaml 0.05 (set in the audio config)
    prenet_depth: int = 0  # D2vModalityConfig, base yamls: blocks inside the modality's context encoder
    prenet_layerdrop: float = 0.0  # D2vModalityConfig
    prenet_dropout: float = 0.1  # base audio yaml: dropout after the context encoder's LayerNorm
    num_extra_tokens: int = 0  # D2vModalityConfig, base yamls: no extra (CLS-like) tokens
    initializer_range: float = 0.02  # init of new heads (fairseq inits Linear with trunc-normal 0.02)

    def validate(self) -> None:
        for name in ("depth", "embed_dim", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.prenet_depth < 0:
            raise ValueError(f"prenet_depth must be >= 0, got {self.prenet_depth}")
        if not self.norm_affine:
            raise ValueError("norm_affine=False is not supported (every released model has affine LayerNorms)")
        if self.num_extra_tokens:
            raise ValueError(f"num_extra_tokens={self.num_extra_tokens} is not supported (0 in every released "
                             "speech and text model)")

    @property
    def hidden_size(self) -> int:
        return self.embed_dim

    @property
    def intermediate_size(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.depth

    def block_kwargs(self) -> dict:
        """TransformerLayer fields of one `AltBlock` with this config."""
        return dict(hidden_size=self.embed_dim, num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                    hidden_dropout=self.encoder_dropout, ffn_dropout=self.post_mlp_drop,
                    attention_dropout=self.attention_dropout, activation_dropout=self.activation_dropout,
                    layer_norm_eps=self.norm_eps, init_std=self.initializer_range,
                    layer_norm_first=self.layer_norm_first, fused_qkv=True)


@dataclasses.dataclass(frozen=True)
class Data2Vec2AudioConfig(_Data2Vec2Config):
    """data2vec 2.0 speech encoder: wav2vec 2.0 CNN, conv positional encoder, ALiBi, AltBlocks."""

    model_type = "data2vec2-audio"

    layerdrop: float = 0.05  # base audio yaml
    feature_encoder_spec: tuple[tuple[int, int, int], ...] = BASE_FEATURE_ENCODER  # D2vAudioConfig default
    extractor_mode: str = "layer_norm"  # D2vAudioConfig default: LayerNorm after every CNN layer
    conv_pos_width: int = 95  # D2vAudioConfig default, base yaml
    conv_pos_groups: int = 16  # D2vAudioConfig default, base yaml
    conv_pos_depth: int = 5  # D2vAudioConfig default, base yaml
    conv_pos_pre_ln: bool = False  # D2vAudioConfig default
    use_alibi_encoder: bool = True  # base audio yaml (D2vModalityConfig default False)
    learned_alibi_scale: bool = True  # base audio yaml
    learned_alibi_scale_per_head: bool = True  # base audio yaml
    learned_alibi_scale_per_layer: bool = False  # D2vModalityConfig default
    alibi_scale: float = 1.0  # D2vModalityConfig default: the initial (or fixed) scale
    # CTC / classification heads
    vocab_size: int = 32  # rows of the CTC projection; the letter dictionary of fairseq's dict.ltr.txt
    pad_token_id: int | None = 0  # CTC blank (fairseq's `<s>` = index 0, renamed `<pad>` as transformers does)
    final_dropout: float = 0.0  # Wav2VecEncoder's final_dropout default
    ctc_loss_reduction: str = "sum"
    ctc_zero_infinity: bool = True  # fairseq's CTC fine-tuning yamls: zero_infinity true
    classifier_proj_size: int = 256

    def validate(self) -> None:
        super().validate()
        if self.extractor_mode != "layer_norm":
            raise ValueError(f"extractor_mode {self.extractor_mode!r}: only 'layer_norm' is supported")
        if self.conv_pos_pre_ln:
            raise ValueError("conv_pos_pre_ln=True is not supported (False in every released model)")
        if self.learned_alibi_scale_per_layer:
            raise ValueError("learned_alibi_scale_per_layer=True is not supported (False in every released model)")
        if self.embed_dim % self.conv_pos_groups:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by conv_pos_groups "
                             f"({self.conv_pos_groups})")
        if any(len(layer) != 3 for layer in self.feature_encoder_spec):
            raise ValueError("feature_encoder_spec must be a sequence of (dim, kernel, stride)")
        if self.ctc_loss_reduction not in ("sum", "mean"):
            raise ValueError(f"ctc_loss_reduction must be 'sum' or 'mean', got {self.ctc_loss_reduction!r}")

    @property
    def conv_pos_kernel(self) -> int:
        """Kernel of each positional conv: fairseq's max(3, conv_pos_width // conv_pos_depth) (19 at base)."""
        return max(3, self.conv_pos_width // self.conv_pos_depth)

    @property
    def alibi_scale_heads(self) -> int:
        return self.num_heads if self.learned_alibi_scale_per_head else 1

    @property
    def conv_kernel(self) -> tuple[int, ...]:
        """CNN kernels, as v1's config names them (`audio.conv_output_lengths` reads these)."""
        return tuple(k for _, k, _ in self.feature_encoder_spec)

    @property
    def conv_stride(self) -> tuple[int, ...]:
        return tuple(s for _, _, s in self.feature_encoder_spec)

    @property
    def add_adapter(self) -> bool:
        return False

    @property
    def inputs_to_logits_ratio(self) -> int:
        return math.prod(s for _, _, s in self.feature_encoder_spec)

    def front_end(self) -> Data2VecAudioConfig:
        """The v1 config whose CNN and positional-conv modules are this model's (same math, reused)."""
        dims, kernels, strides = zip(*self.feature_encoder_spec)
        return Data2VecAudioConfig(
            hidden_size=self.embed_dim, num_attention_heads=self.num_heads, conv_dim=dims, conv_kernel=kernels,
            conv_stride=strides, conv_bias=False, num_conv_pos_embeddings=self.conv_pos_depth,
            conv_pos_kernel_size=self.conv_pos_kernel, num_conv_pos_embedding_groups=self.conv_pos_groups,
            layer_norm_eps=1e-5, vocab_size=self.vocab_size, pad_token_id=self.pad_token_id,
            final_dropout=self.final_dropout, id2label=self.id2label, ctc_loss_reduction=self.ctc_loss_reduction,
            ctc_zero_infinity=self.ctc_zero_infinity, classifier_proj_size=self.classifier_proj_size,
            initializer_range=self.initializer_range, mask_time_prob=0.0)


@dataclasses.dataclass(frozen=True)
class Data2Vec2TextConfig(_Data2Vec2Config):
    """data2vec 2.0 text encoder: learned token and position embeddings, AltBlocks (no ALiBi, no pos conv)."""

    model_type = "data2vec2-text"

    prenet_dropout: float = 0.0  # unused by text (no context encoder norm at prenet_depth 0)
    vocab_size: int = 50265  # rows of embed_tokens with the RoBERTa BPE dictionary (REFERENCE.md §5.5.3)
    max_source_positions: int = 512  # D2vTextConfig default, base yaml
    learned_pos: bool = True  # D2vTextConfig default, base yaml
    dropout: float = 0.1  # D2vTextConfig default: dropout after the embedding LayerNorm
    no_scale_embedding: bool = True  # D2vTextConfig default: token embeddings are not scaled by sqrt(dim)
    layernorm_embedding: bool = True  # D2vTextConfig default
    pad_token_id: int = 1  # fairseq Dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3
    bos_token_id: int = 0
    eos_token_id: int = 2
    classifier_dropout: float | None = None  # heads: None means `dropout`

    def validate(self) -> None:
        super().validate()
        if not self.learned_pos:
            raise ValueError("learned_pos=False (sinusoidal positions) is not supported (True in every released "
                             "text model)")
        if not self.no_scale_embedding or not self.layernorm_embedding:
            raise ValueError("only no_scale_embedding=True and layernorm_embedding=True (the released text "
                             "models) are supported")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must lie in [0, vocab_size={self.vocab_size})")

    @property
    def max_position_embeddings(self) -> int:
        """Rows of embed_positions: positions count from pad + 1 (fairseq's make_positions)."""
        return self.max_source_positions + self.pad_token_id + 1

    def heads_config(self) -> Data2VecTextConfig:
        """The v1 config the reused text heads (LM head, classification head) read their sizes from."""
        return Data2VecTextConfig(
            vocab_size=self.vocab_size, hidden_size=self.embed_dim, num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size, layer_norm_eps=self.norm_eps, id2label=self.id2label,
            problem_type=self.problem_type, hidden_dropout_prob=self.dropout,
            classifier_dropout=self.classifier_dropout, initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id, max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=1)
