"""The pre-start estimate: parameter counts exact, memory and time grow the way training does."""
from core.lora.config import LoraConfig
from core.model.config import PRESETS, TARGET_MODULES as TARGET_MODULES_ALL
from core.train.config import TrainConfig
from core.train.estimate import estimate_training, human_bytes, human_seconds


def test_gpt2_rank8_c_attn_counts_and_adapter_size():
    e = estimate_training(PRESETS["gpt2"], LoraConfig(r=8, targets=("attn.c_attn",)), TrainConfig(), "cuda")
    assert e.trainable_params == 294_912
    assert round(e.share_percent, 2) == 0.24
    assert 1.0e6 < e.adapter_bytes < 1.3e6  # ~1.1 MB of fp32 weights, as the issue says


def test_memory_follows_batch_model_size_and_savings():
    cfg, lc = PRESETS["gpt2"], LoraConfig()
    small = estimate_training(cfg, lc, TrainConfig(batch_size=4, seq_len=128), "cuda")
    big = estimate_training(cfg, lc, TrainConfig(batch_size=16, seq_len=1024), "cuda")
    assert big.peak_bytes > small.peak_bytes and big.activation_bytes > 10 * small.activation_bytes
    xl = estimate_training(PRESETS["gpt2-xl"], lc, TrainConfig(batch_size=4, seq_len=128), "cuda")
    nf4 = estimate_training(PRESETS["gpt2-xl"], lc, TrainConfig(batch_size=4, seq_len=128), "cuda",
                            weights="nf4", checkpointing=True)
    # measured on the H200 (README): 4.0 GiB bf16, 1.29 GiB NF4 + checkpointing
    assert 3.6 < xl.peak_bytes / 2**30 < 4.6 and 1.0 < nf4.peak_bytes / 2**30 < 1.6


def test_time_scales_with_steps_and_graphs_cut_overhead():
    cfg, lc = PRESETS["gpt2"], LoraConfig()
    a = estimate_training(cfg, lc, TrainConfig(steps=100), "cuda")
    b = estimate_training(cfg, lc, TrainConfig(steps=200), "cuda")
    assert abs(b.total_seconds - 2 * a.total_seconds) < 1e-9
    assert estimate_training(cfg, lc, TrainConfig(), "cuda", cuda_graphs=True).step_seconds < a.step_seconds
    assert estimate_training(cfg, lc, TrainConfig(), "cpu").step_seconds > 10 * a.step_seconds


def test_human_units():
    assert human_bytes(1536) == "1.5 KB" and human_bytes(3 * 2**30) == "3.0 GB"
    assert human_seconds(59) == "59s" and human_seconds(61) == "1m 01s" and human_seconds(3700) == "1h 01m"


def test_dora_counts_its_magnitudes_and_their_activations():
    cfg = PRESETS["gpt2"]
    plain = LoraConfig(r=8, targets=("attn.c_attn", "mlp.c_fc"))
    dora = LoraConfig(r=8, targets=("attn.c_attn", "mlp.c_fc"), use_dora=True)
    a, b = estimate_training(cfg, plain, TrainConfig(), "cpu"), estimate_training(cfg, dora, TrainConfig(), "cpu")
    assert b.trainable_params - a.trainable_params == cfg.n_layer * (3 + 4) * cfg.n_embd  # one per output feature
    assert b.activation_bytes > a.activation_bytes and b.peak_bytes > a.peak_bytes


def _saved_bytes(lcfg, B=4, T=64):
    """Bytes autograd keeps for the backward of one forward pass (each storage once, as memory holds it)."""
    import torch
    from core.lora.layers import add_adapter
    from core.model.config import GPTConfig
    from core.model.gpt import GPT, init_random_
    model = init_random_(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128)))
    add_adapter(model, "a", lcfg)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 50257, (B, T)), "a")
    return sum(seen.values())


def test_the_dora_activation_term_matches_what_autograd_keeps():
    from core.model.config import GPTConfig
    cfg, targets = GPTConfig(n_layer=2, n_head=4, n_embd=128), TARGET_MODULES_ALL
    plain, dora = LoraConfig(r=8, targets=targets), LoraConfig(r=8, targets=targets, use_dora=True)
    tc = TrainConfig(batch_size=4, seq_len=64)
    predicted = (estimate_training(cfg, dora, tc, "cpu").activation_bytes
                 - estimate_training(cfg, plain, tc, "cpu").activation_bytes)
    measured = _saved_bytes(dora) - _saved_bytes(plain)
    assert measured > 0 and 0.8 < predicted / measured < 1.25, (predicted, measured)
