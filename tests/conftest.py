"""Shared test fixtures: tiny random transformers models and one way to compare outputs."""

import numpy as np
import pytest
import torch
import transformers

TOL = 1e-4  # max abs difference allowed against transformers in float32

AUDIO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
         "conv_dim": (16, 16, 16), "conv_stride": (5, 2, 2), "conv_kernel": (10, 3, 3),
         "num_conv_pos_embedding_groups": 4, "conv_pos_kernel_size": 5, "num_conv_pos_embeddings": 3, "vocab_size": 12,
         "classifier_proj_size": 10, "tdnn_dim": (8, 8, 12), "tdnn_kernel": (3, 3, 1), "tdnn_dilation": (1, 2, 1),
         "xvector_output_dim": 6, "num_labels": 3}
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37, "vocab_size": 99,
        "max_position_embeddings": 40, "num_labels": 3}


def tiny_torch_model(name: str, seed: int = 0, **overrides):
    """A random transformers model of class `name`, biases and norms perturbed so nothing is a constant."""
    torch.manual_seed(seed)
    audio = name.startswith("Data2VecAudio")
    config_cls = transformers.Data2VecAudioConfig if audio else transformers.Data2VecTextConfig
    extra = {"Data2VecTextForCausalLM": {"is_decoder": True}, "Data2VecTextForQuestionAnswering": {"num_labels": 2}}
    extra = extra.get(name, {})
    model = getattr(transformers, name)(config_cls(**{**(AUDIO if audio else TEXT), **extra, **overrides})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower() or n.endswith("bias") or "layer_weights" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model



def assert_close(name, got, want, tol=TOL):
    """got (flax) == want (torch or numpy) within `tol` max abs diff; tuples and None compared item by item."""
    if want is None or (isinstance(want, tuple) and len(want) == 0):
        assert got is None or len(got) == 0, f"{name}: flax gave a value, torch none"
        return
    if isinstance(want, (tuple, list)):
        assert got is not None and len(got) == len(want), f"{name}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(f"{name}[{i}]", g, w, tol)
        return
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    got = np.asarray(got)
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs torch {want.shape}"
    diff = np.max(np.abs(got.astype(np.float64) - want)) if want.size else 0.0
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol}"


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """This test converts into its own cache, never ~/.cache (files use it with `pytestmark`)."""
    monkeypatch.setenv("FLAX_DATA2VEC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def audio_model():
    """A tiny random transformers Data2VecAudioModel."""
    return tiny_torch_model("Data2VecAudioModel")
