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
_TINY_CNN = ((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2
_NO_DROPOUT2 = dict(encoder_dropout=0.0, attention_dropout=0.0, post_mlp_drop=0.0, layerdrop=0.0)
AUDIO2_PRESETS = {  # data2vec 2.0 speech (Data2Vec2AudioConfig fields); "base" is the released base
    "tiny": dict(depth=2, embed_dim=128, num_heads=4, mlp_ratio=2.0, feature_encoder_spec=_TINY_CNN,
                 prenet_dropout=0.0, **_NO_DROPOUT2),
    "base": {},
    "large": dict(depth=16, prenet_depth=8, embed_dim=1024, num_heads=16),  # large_audio_only_task.yaml
}
TEXT2_PRESETS = {  # data2vec 2.0 text (Data2Vec2TextConfig fields)
    "tiny": dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=2.0),
    "base": {},
    "large": dict(depth=24, embed_dim=1024, num_heads=16),
}
PRESETS = tuple(AUDIO_PRESETS)  # tiny, base, large: the same names in every table
