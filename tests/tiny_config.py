"""A tiny but complete CLIP architecture for tests and the benchmarks' smoke runs: the real vocabulary,
77 positions and 224 px input, so random weights of this size exercise every code path in seconds."""

TINY = {
    "projection_dim": 16,
    "text_config": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 2,
                    "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu",
                    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 2,
                      "patch_size": 32, "image_size": 224, "num_channels": 3, "hidden_act": "gelu",
                      "layer_norm_eps": 1e-5},
}
