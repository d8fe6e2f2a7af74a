"""Every fast or memory-saving path equals the plain one: quantized base, checkpointing, static decode."""
import pytest
import torch

from core.lora import layers as lora
from core.lora.config import LoraConfig
from core.generate.sampling import SamplingConfig, generate
from core.model.quant import quantize_base, weight_bytes
from core.model.weights import load_base
from adapter_helpers import randomize_b

IDS = torch.randint(0, 50000, (2, 48), generator=torch.Generator().manual_seed(0))


def loss_and_grads(model, name="a"):
    model.zero_grad(set_to_none=True)
    logits = model(IDS[:, :-1], name)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), IDS[:, 1:].flatten())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora.lora_parameters(model, name)]


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("nf4", 0.15)])
def test_quantized_base_stays_close_and_trains_the_adapter(tiny, mode, tol):
    lora.add_adapter(tiny, "a", LoraConfig(r=4, targets=("attn.c_attn", "mlp.c_fc")))
    randomize_b(tiny, "a")
    with torch.no_grad():
        ref = tiny(IDS, "a")
    before = weight_bytes(tiny)
    quantize_base(tiny, mode)
    with torch.no_grad():
        q = tiny(IDS, "a")
    assert (q - ref).abs().max() <= tol * ref.abs().max()
    assert weight_bytes(tiny) < before
    _, grads = loss_and_grads(tiny)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny):
    lora.add_adapter(tiny, "a", LoraConfig(r=4, targets=("attn.c_attn", "mlp.c_proj")))
    randomize_b(tiny, "a")
    tiny.train()
    loss, grads = loss_and_grads(tiny)
    tiny.checkpointing = True
    loss_ck, grads_ck = loss_and_grads(tiny)
    assert torch.equal(loss, loss_ck)
    for g, gc in zip(grads, grads_ck):
        assert torch.allclose(g, gc, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_captured_decode_steps_equal_the_eager_ones_and_see_adapters_trained_since(tiny, temperature):
    """The fixed buffers a CUDA graph replays (per batch bucket), run on the CPU by replaying the step again:
    same tokens as eager steps, and a scheduler kept between calls sees an adapter trained meanwhile."""
    from core.generate.scheduler import DecodeScheduler
    lora.add_adapter(tiny, "a", LoraConfig(r=4, targets=("attn.c_attn",)))
    lora.add_adapter(tiny, "b", LoraConfig(r=8, targets=("mlp.c_fc", "mlp.c_proj")))
    randomize_b(tiny, "a", std=0.3, seed=1)
    randomize_b(tiny, "b", std=0.3, seed=2)
    cfg = SamplingConfig(max_new_tokens=20, temperature=temperature, seed=4, stop_at_eot=False)
    prompts = [[464, 2068, 7586], [464, 2068, 7586, 21831, 18045], [11], [464, 2068, 7586]]
    names = [None, "a", "b", "a"]
    sched = DecodeScheduler(tiny, max_rows=8, max_len=64, thread=False, graphs=True, capture=lambda step, pool: step)

    def captured():
        reqs = [sched.submit(p, [n], cfg) for p, n in zip(prompts, names)]
        sched.run_until_idle()
        return [r.result(0)[0] for r in reqs]

    plain = generate(tiny, prompts, names, cfg)
    assert captured() == plain
    assert captured() == plain  # the captured steps replayed again
    assert sched.runner._buckets  # they were captured steps
    # training the adapter in place after the steps were captured: they see the new weights
    randomize_b(tiny, "a", std=0.3, seed=9)
    assert captured() == generate(tiny, prompts, names, cfg) != plain


def test_chunked_loss_equals_the_full_loss_and_its_gradients(tiny):
    lora.add_adapter(tiny, "a", LoraConfig(r=4, targets=("attn.c_attn",)))
    randomize_b(tiny, "a")
    tiny.train()
    x, y = IDS[:, :-1], IDS[:, 1:]
    full = tiny.loss(x, y, "a", chunk=0)
    full.backward()
    grads = [p.grad.clone() for p in lora.lora_parameters(tiny, "a")]
    tiny.zero_grad(set_to_none=True)
    chunked = tiny.loss(x, y, "a", chunk=16)  # 94 tokens in 6 chunks, the last one short
    chunked.backward()
    reference = torch.nn.functional.cross_entropy(tiny(x, "a").flatten(0, 1), y.flatten())
    assert torch.allclose(full, reference, atol=1e-6) and torch.allclose(chunked, full, atol=1e-6)
    for g, p in zip(grads, lora.lora_parameters(tiny, "a")):
        assert torch.allclose(g, p.grad, atol=1e-7, rtol=1e-4)


def test_quantized_matmul_gradients_equal_a_dequantized_copy(tiny):
    """The quantized layer's custom backward gives the input gradient of the dequantized weight."""
    from core.model.quant import QuantConv1D
    layer = tiny.transformer.h[0].mlp.c_fc
    q = QuantConv1D(layer, "nf4")
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    q(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (torch.addmm(q.bias, x2.reshape(-1, q.in_features), q.dequantize()).square().sum()).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def bf16_loss_and_grads(model, x, y, fused: bool, monkeypatch):
    """The loss and LoRA gradients of a bf16 base, through the fused head + cross entropy or the plain path."""
    from core.model import fused_ce
    monkeypatch.setattr(fused_ce, "applies", lambda h, w: fused)
    model.zero_grad(set_to_none=True)
    loss = model.loss(x, y, "a", chunk=0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora.lora_parameters(model, "a")]


def test_fused_head_and_cross_entropy_equals_the_plain_path_on_a_bf16_base(monkeypatch):
    from core.model import fused_ce
    model = load_base("tiny", device="cpu", dtype=torch.bfloat16)
    lora.add_adapter(model, "a", LoraConfig(r=4, targets=("attn.c_attn", "mlp.c_fc")))
    randomize_b(model, "a")
    x, y = IDS[:, :-1], IDS[:, 1:].clone()
    y[0, :10] = -100  # prompt tokens of instruction data: in neither the loss nor the gradient
    h = model.hidden(x, "a").flatten(0, 1)
    assert fused_ce.applies(h, model.lm_head.weight)  # what training on a bf16 base on the CPU takes
    with torch.no_grad():
        assert not fused_ce.applies(model.hidden(x, "a").flatten(0, 1), model.lm_head.weight)  # evaluation
    monkeypatch.setattr(fused_ce, "CHUNK_BYTES", 4 * 50257 * 16)  # 16 rows a chunk: 94 tokens in 6, one short
    plain_loss, plain_grads = bf16_loss_and_grads(model, x, y, False, monkeypatch)
    fused_loss, fused_grads = bf16_loss_and_grads(model, x, y, True, monkeypatch)
    assert torch.allclose(fused_loss, plain_loss, rtol=1e-5)
    for f, p in zip(fused_grads, plain_grads):
        assert p.abs().max() > 0  # the adapter learns
        assert torch.allclose(f, p, rtol=0.02, atol=1e-3 * p.abs().max().item())
    # a micro-batch whose targets are all ignored: loss 0 and no gradient, as on the plain path
    loss, grads = bf16_loss_and_grads(model, x, torch.full_like(y, -100), True, monkeypatch)
    assert loss.item() == 0 and all(g.abs().max() == 0 for g in grads)


def test_fp32_keeps_the_plain_loss_and_attention(tiny):
    """The bf16 fast paths (fused head + cross entropy, fp32 attention) leave fp32 training as it was."""
    from core.model import fused_ce
    from core.model.gpt import _attention_in_fp32
    h = torch.randn(4, tiny.config.n_embd, requires_grad=True)
    assert not fused_ce.applies(h, tiny.lm_head.weight)
    assert not _attention_in_fp32(torch.randn(1, 2, 8, 32))
    assert _attention_in_fp32(torch.randn(1, 2, 8, 32, dtype=torch.bfloat16))
    assert not _attention_in_fp32(torch.randn(1, 2, 1024, 32, dtype=torch.bfloat16))  # long: bf16 is faster there


def test_bf16_training_attention_in_fp32_stays_within_bf16_of_bf16_attention(monkeypatch):
    from core.model import gpt
    model = load_base("tiny", device="cpu", dtype=torch.bfloat16)
    lora.add_adapter(model, "a", LoraConfig(r=4, targets=("attn.c_attn",)))
    randomize_b(model, "a")
    x, y = IDS[:, :-1], IDS[:, 1:]
    runs = []
    for fp32 in (True, False):
        monkeypatch.setattr(gpt, "_attention_in_fp32", lambda q, fp32=fp32: fp32)
        model.zero_grad(set_to_none=True)
        loss = model.loss(x, y, "a", chunk=0)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in lora.lora_parameters(model, "a")]))
    (l32, g32), (l16, g16) = runs
    assert torch.allclose(l32, l16, rtol=1e-3)
    for a, b in zip(g32, g16):
        assert b.abs().max() > 0
        assert torch.allclose(a, b, rtol=0.05, atol=0.02 * b.abs().max().item())


def test_the_cpu_layout_keeps_shapes_results_merged_copies_and_saved_weights(hf_small):
    """On the CPU the projections' (in, out) weights sit in (out, in) memory order (faster for a few rows);
    everything that reads them sees the same tensors, and the outputs equal the (in, out) order's."""
    from core.model.gpt import Conv1D
    from core.model.weights import build, hf_state_dict, read_local
    from safetensors.torch import load_file
    model = load_base(str(hf_small), device="cpu")
    cfg, state = read_local(hf_small)
    plain = build(cfg, state).eval()  # the same weights, (in, out) memory order, the file's own tensors
    # the CPU's copies own their memory: no weight keeps the file's tensors (or their mapped pages) alive
    ours = build(cfg, state, cpu_dtype=torch.float32)
    file_ptrs = {v.untyped_storage().data_ptr() for v in state.values()}
    assert not file_ptrs & {p.untyped_storage().data_ptr() for p in ours.parameters()}
    convs = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert convs and all(m.weight.stride(0) == 1 and m.weight.shape == (m.in_features, m.out_features)
                         for m in convs)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, Conv1D))
    ids = IDS[:, :16]
    with torch.no_grad():
        assert torch.allclose(model(ids), plain(ids), rtol=1e-5, atol=1e-5)
        # one row and a few rows: the shapes where the order changes the kernel
        assert torch.allclose(model(ids[:1, :1]), plain(ids[:1, :1]), rtol=1e-5, atol=1e-5)
    # saved == loaded, bit for bit, in HF's (in, out) layout
    saved, original = hf_state_dict(model), load_file(str(hf_small / "model.safetensors"))
    assert all(torch.equal(saved[k], original[k]) for k in original)
    # an adapter changes the output; the merged copy (read from the CPU's order) == the routed adapter
    from core.adapters.export import merged_state_dict
    lora.add_adapter(model, "a", LoraConfig(r=4))
    randomize_b(model, "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(ids)
        adapted = model(ids, "a")
        assert not torch.allclose(base, adapted, atol=1e-3)
        merged = build(cfg, merged_state_dict(model, "a"), cpu_dtype=torch.float32)
        assert (merged(ids) - adapted).abs().max() <= 1e-5
    assert all(m.base.weight.stride(0) == 1 for m in lora.lora_layers(model).values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
