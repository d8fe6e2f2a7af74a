"""LoRA: named adapters on one frozen base, per-row routing, a merged copy equal to the routed adapter."""
import pytest
import torch

from core.adapters.export import merged_state_dict
from core.lora import layers as lora, variants
from core.lora.config import LoraConfig
from core.model.config import PRESETS, TARGET_MODULES
from core.model.gpt import GPT
from core.model.weights import build
from adapter_helpers import randomize_b


@pytest.fixture
def two_adapters(tiny):
    lora.add_adapter(tiny, "a", LoraConfig(r=4, alpha=8, targets=("attn.c_attn", "mlp.c_fc")), seed=1)
    lora.add_adapter(tiny, "b", LoraConfig(r=8, alpha=16, targets=("attn.c_proj", "mlp.c_proj")), seed=2)
    randomize_b(tiny, "a", seed=1)
    randomize_b(tiny, "b", seed=2)
    return tiny


IDS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])


def logits(model, names=None, route=None):
    """names: each row's adapter (a mixed batch); route: one route for the one row (None: the base)."""
    with torch.no_grad():
        return model(IDS.repeat(len(names), 1) if names else IDS, lora.make_route(model, names) if names else route)


def test_fresh_adapter_is_the_identity(tiny):
    base = logits(tiny)
    lora.add_adapter(tiny, "fresh", LoraConfig())
    assert torch.equal(logits(tiny, route="fresh"), base)


def test_adapter_changes_the_output(two_adapters):
    base = logits(two_adapters)
    assert (logits(two_adapters, route="a") - base).abs().max() > 1e-3


def test_merged_copy_equals_the_routed_adapter_and_leaves_the_base_bit_identical(two_adapters):
    m = two_adapters
    before = {k: v.clone() for k, v in m.state_dict().items()}
    merged = build(m.config, merged_state_dict(m, "a"))  # the merged export's weights
    assert (logits(merged) - logits(m, route="a")).abs().max() <= 1e-5
    assert (logits(merged) - logits(m)).abs().max() > 1e-3  # it holds the adapter, not the base
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mixed_batch_equals_each_row_alone(two_adapters):
    m = two_adapters
    mixed = logits(m, [None, "a", "b", "a"])
    for row, name in enumerate([None, "a", "b", "a"]):
        alone = logits(m, route=name)[0]
        assert (mixed[row] - alone).abs().max() <= 1e-5, (row, name)
    assert not torch.allclose(mixed[0], mixed[1])


def test_switching_adapters_leaves_base_weights_bit_identical(two_adapters):
    m = two_adapters
    base = {k: (v.data_ptr(), v.clone()) for k, v in m.state_dict().items() if ".lora_" not in k}
    for name in ["a", "b", None, "a", "b"] * 3:
        logits(m, route=name)
    for k, v in m.state_dict().items():
        if ".lora_" not in k:
            assert v.data_ptr() == base[k][0] and torch.equal(v, base[k][1]), k


def test_only_lora_parameters_require_grad(two_adapters):
    trainable = [n for n, p in two_adapters.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_gpt2_rank8_on_c_attn_has_294912_trainable_parameters():
    cfg = PRESETS["gpt2"]
    assert lora.count_lora_params(cfg, 8, ["attn.c_attn"]) == 294_912
    assert round(100 * 294_912 / cfg.n_params(), 2) == 0.24
    with torch.device("meta"):
        model = GPT(cfg)
    lora.add_adapter(model, "x", LoraConfig(r=8, targets=("attn.c_attn",)))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 294_912


def test_adapter_names_may_contain_dots_and_dashes(tiny):
    lora.add_adapter(tiny, "v1.2-final_x", LoraConfig())
    assert "v1.2-final_x" in lora.adapter_names(tiny)
    lora.remove_adapter(tiny, "v1.2-final_x")
    assert lora.adapter_names(tiny) == []


def test_bad_settings_are_refused_with_clear_messages(tiny):
    for bad, msg in [(LoraConfig(r=0), "rank"), (LoraConfig(alpha=0), "alpha"),
                     (LoraConfig(targets=("attn.q_proj",)), "unknown target"),
                     (LoraConfig(r=65), "larger than the model width")]:
        with pytest.raises(ValueError, match=msg):
            lora.add_adapter(tiny, "bad", bad)
    with pytest.raises(KeyError, match="no adapter named"):
        lora.make_route(tiny, ["missing"])


def test_state_dict_round_trip_is_bit_identical(two_adapters, tiny):
    state = lora.adapter_state_dict(two_adapters, "a")
    lora.load_adapter_state(two_adapters, "a2", state, alpha=8)
    for k, v in lora.adapter_state_dict(two_adapters, "a2").items():
        assert torch.equal(v, state[k])
    assert torch.equal(logits(two_adapters, ["a"]), logits(two_adapters, ["a2"]))


def test_base_only_batches_keep_no_reference_to_the_model():
    """A base-only route is a stateless marker: switching the studio's base frees the old one."""
    import gc
    import weakref
    from core.generate.sampling import SamplingConfig, generate
    from core.model.weights import load_base
    m = load_base("tiny", device="cpu")
    lora.add_adapter(m, "a", LoraConfig())
    generate(m, [[464, 2068]], [None], SamplingConfig(max_new_tokens=2))
    ref = weakref.ref(m.transformer.h[0].attn.c_attn.base.weight)
    del m
    gc.collect()
    assert ref() is None


def test_loading_saved_tensors_draws_no_random_numbers(tiny):
    state = {"transformer.h.0.attn.c_attn.lora_A.weight": torch.ones(4, 64),
             "transformer.h.0.attn.c_attn.lora_B.weight": torch.ones(192, 4)}
    before = torch.get_rng_state()
    lora.load_adapter_state(tiny, "x", state, alpha=8)
    assert torch.equal(before, torch.get_rng_state())  # a training run's dropout stream is untouched


class Halved(variants.Lora):
    """A made-up variant for the seam: half of plain LoRA's update, not gathered with other adapters' rows."""
    label = "halved"
    low_rank = False

    def update(self, layer, name, x, y=None):
        return 0.5 * super().update(layer, name, x, y)

    def plus(self, layer, name, x, y):
        return y + layer.lora(x, name, y=y)

    def delta(self, layer, name):
        return 0.5 * super().delta(layer, name)


def test_the_layer_asks_the_adapters_variant_for_its_forward_mixed_rows_and_merged_weight(two_adapters):
    m = two_adapters
    full = logits(m, route="a")
    for layer in lora.lora_layers(m).values():
        if layer.has("a"):
            layer.variant["a"] = Halved()
    half = logits(m, route="a")
    base = logits(m)
    assert (half - base).abs().max() > 1e-3 and (half - full).abs().max() > 1e-3
    mixed = logits(m, [None, "a", "b"])  # "a" rows run apart (not low-rank), "b" rows gathered
    for row, name in enumerate([None, "a", "b"]):
        assert (mixed[row] - logits(m, route=name)[0]).abs().max() <= 1e-5, name
    merged = build(m.config, merged_state_dict(m, "a"))
    assert (logits(merged) - half).abs().max() <= 1e-5


def test_each_gpt2_target_name_is_spelled_in_one_file():
    """Code names the four projections by core.model.config's constants (docstrings and messages aside)."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    spelled = {}
    for path in [p for d in ("core", "studio") for p in (root / d).rglob("*.py")]:
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef,
                ast.FunctionDef, ast.AsyncFunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in TARGET_MODULES and id(node) not in docs:
                spelled.setdefault(str(path.relative_to(root)), []).append(node.value)
    assert list(spelled) == ["core/model/config.py"], spelled
