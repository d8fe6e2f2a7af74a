"""Generation: one decode engine (scheduler, KV slots, model runner, sampler) and its offline entry (sampling)."""
