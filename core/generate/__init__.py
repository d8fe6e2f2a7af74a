"""Generation: sampling and the decoders (dynamic KV cache, CUDA-graphed static cache)."""
