"""Every fast or memory-saving path equals the plain one: quantized base, checkpointing, static decode."""
import pytest
import torch

from core.lora import layers as lora
from core.model.config import LoraConfig
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
    with pytest.raises(RuntimeError, match="quantized base"):
        lora.merge(tiny, "a")


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
def test_static_decode_equals_the_dynamic_cache(tiny, temperature):
    """The buffers a CUDA graph replays, run eagerly on the CPU: same tokens as the plain path."""
    lora.add_adapter(tiny, "a", LoraConfig(r=4, targets=("attn.c_attn",)))
    lora.add_adapter(tiny, "b", LoraConfig(r=8, targets=("mlp.c_fc", "mlp.c_proj")))
    randomize_b(tiny, "a", std=0.3, seed=1)
    randomize_b(tiny, "b", std=0.3, seed=2)
    cfg = SamplingConfig(max_new_tokens=20, temperature=temperature, seed=4, stop_at_eot=False)
    prompts = [[464, 2068, 7586], [464, 2068, 7586, 21831, 18045], [11], [464, 2068, 7586]]
    names = [None, "a", "b", "a"]
    plain = generate(tiny, prompts, names, cfg)
    assert generate(tiny, prompts, names, cfg, static=True) == plain
    assert generate(tiny, prompts, names, cfg, static=True) == plain  # a reused decoder
    # training the adapter in place after a decoder was cached: the reused one sees the new weights
    randomize_b(tiny, "a", std=0.3, seed=9)
    assert generate(tiny, prompts, names, cfg, static=True) == generate(tiny, prompts, names, cfg)


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
