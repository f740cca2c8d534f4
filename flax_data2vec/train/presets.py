"""The model sizes `--model tiny|base|large` name: changes to the default audio / text model config.

Plain data (no imports), so the command line checks `--model` and `--model-config` against them before JAX loads.
"""

AUDIO_PRESETS = {
    # small enough to leave CTC's all-blank plateau within ~150 steps from scratch on CPU (4 layers or a
    # 128-wide CNN stay on it for hundreds of steps, in transformers' PyTorch model too)
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 conv_dim=(64,) * 7, num_conv_pos_embedding_groups=16, layerdrop=0.0, hidden_dropout=0.0,
                 activation_dropout=0.0, attention_dropout=0.0, final_dropout=0.0, mask_time_min_masks=0),
    "base": {},
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
TEXT_PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                 max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
    "base": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
    "large": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                  hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
PRESETS = tuple(AUDIO_PRESETS)  # tiny, base, large: the same names as TEXT_PRESETS
