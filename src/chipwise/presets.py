"""Model shapes by name. `tiny` is the CPU demo; the published shapes are for planning and AOT checks."""

PRESETS: dict[str, dict] = {
    # Small enough to train on two CPU cores in a few minutes: at that compute budget (~1e13 FLOPs) a model
    # this size learns fastest per second (a 4x wider one reached the same loss at the same tokens, 2x slower).
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, d_ff=352, vocab_size=8192,
                 tie_embeddings=True, max_seq_len=512),
    # GPT-3 small/medium-sized Llama shapes (GPT-3 paper table 2.1 widths, Llama-2 tokenizer size).
    "125m": dict(num_layers=12, d_model=768, num_heads=12, num_kv_heads=12, d_ff=2048, vocab_size=32000,
                 tie_embeddings=True, max_seq_len=2048),
    "350m": dict(num_layers=24, d_model=1024, num_heads=16, num_kv_heads=16, d_ff=2816, vocab_size=32000,
                 tie_embeddings=True, max_seq_len=2048),
    # Llama 3.2 1B (config.json on the Hugging Face hub; its rope_scaling too, at a shorter context).
    "1b": dict(num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, d_ff=8192, vocab_size=128256,
               tie_embeddings=True, rope_theta=500000.0, max_seq_len=8192, rope_type="llama3", rope_factor=32.0,
               rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_seq_len=8192),
    # Llama 2 paper (Touvron et al. 2023), table 1 and the released config.json files.
    "llama2-7b": dict(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32, d_ff=11008, vocab_size=32000,
                      tie_embeddings=False, max_seq_len=4096),
    "llama2-70b": dict(num_layers=80, d_model=8192, num_heads=64, num_kv_heads=8, d_ff=28672, vocab_size=32000,
                       tie_embeddings=False, max_seq_len=4096),
    # Llama 3 herd paper (Dubey et al. 2024), table 3.
    "llama3-8b": dict(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, d_ff=14336, vocab_size=128256,
                      tie_embeddings=False, rope_theta=500000.0, max_seq_len=8192),
    "llama3-70b": dict(num_layers=80, d_model=8192, num_heads=64, num_kv_heads=8, d_ff=28672, vocab_size=128256,
                       tie_embeddings=False, rope_theta=500000.0, max_seq_len=8192),
    "llama3-405b": dict(num_layers=126, d_model=16384, num_heads=128, num_kv_heads=8, d_ff=53248,
                        vocab_size=128256, tie_embeddings=False, rope_theta=500000.0, max_seq_len=8192),
    # GPT-3 175B (Brown et al. 2020): GELU MLP of 4x width, tied embeddings. GPT-3 used learned positions;
    # chipwise uses rotary ones, which changes no matmul shape, so FLOPs and memory plans are unaffected.
    "gpt3-175b": dict(num_layers=96, d_model=12288, num_heads=96, num_kv_heads=96, d_ff=49152, vocab_size=50257,
                      ffn="gelu", tie_embeddings=True, max_seq_len=2048),
}
