"""DoRA (use_dora): a magnitude vector per target on top of B A. Adapters trained here load in PEFT with
the same logits, PEFT's DoRA adapters load here, a merged export matches PEFT's merge_and_unload, mixed
batches with DoRA rows equal each row alone, the merged copy leaves the base bit for bit, blends refuse."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft_helpers import hf as _hf, hf_logits as _hf_logits, peft_made  # noqa: E402
from adapter_helpers import base_tensors, logits  # noqa: E402
from core.adapters.blend import blend_states  # noqa: E402
from core.adapters.export import export_merged, merged_state_dict  # noqa: E402
from core.adapters.format import CONFIG, WEIGHTS, save_adapter  # noqa: E402
from core.adapters.resolve import load_adapter  # noqa: E402
from core.adapters.validate import AdapterError  # noqa: E402
from core.adapters.library import Library  # noqa: E402
from core.lora import layers as lora  # noqa: E402
from core.lora.config import LoraConfig
from core.model.config import TARGET_MODULES
from core.model.weights import build, load_base  # noqa: E402
from core.train.trainer import Trainer  # noqa: E402
from train_helpers import quick, train_solo  # noqa: E402

TOL = 1e-4
DORA = LoraConfig(r=4, alpha=8.0, targets=TARGET_MODULES, use_dora=True)


def make_dora(model, name, lcfg=DORA, seed=0):
    """A DoRA adapter with random B and a magnitude moved off its init, so both parts matter."""
    lora.add_adapter(model, name, lcfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            if layer.has(name):
                layer.weights(name)[1].copy_(torch.randn(layer.weights(name)[1].shape, generator=g) * 0.05)
                m = layer.lora_magnitude_vector[layer.keys[name]]
                m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))


def test_fresh_dora_adapter_is_the_base_and_a_moved_one_is_not(hf_small):
    model = load_base(str(hf_small), device="cpu")
    lora.add_adapter(model, "fresh", DORA, seed=1)
    base = logits(model, None)
    assert (logits(model, "fresh") - base).abs().max() <= 1e-5  # m = ||W||, B = 0: exactly the base
    make_dora(model, "d", seed=2)
    assert (logits(model, "d") - base).abs().max() > 1e-2
    n = sum(p.numel() for p in lora.lora_parameters(model, "d"))
    assert n == lora.count_lora_params(model.config, DORA.r, DORA.targets, DORA)
    assert n > lora.count_lora_params(model.config, DORA.r, DORA.targets)


def test_trained_here_loads_in_peft(hf_small, sample_ds, tmp_path):
    model = load_base(str(hf_small), device="cpu")
    lc = LoraConfig(r=4, alpha=8.0, dropout=0.1, targets=("attn.c_attn", "mlp.c_proj"), use_dora=True)
    ds = sample_ds
    before = {k: v.clone() for k, v in base_tensors(model).items()}
    events = train_solo(Trainer(model, ds, lc, quick(steps=4), "t", tmp_path / "run", base_id=str(hf_small)))
    assert events[-1]["type"] == "done", events[-1]
    mags = [l.lora_magnitude_vector[l.keys["t"]] for l in lora.lora_layers(model).values() if l.has("t")]
    # PEFT's init for the trained A and B: ||W + s B A|| per output feature
    init = [torch.linalg.norm(l.base.weight.float().t() + l.delta("t").detach(), dim=1)
            for l in lora.lora_layers(model).values() if l.has("t")]
    assert any((m - i).abs().max() > 1e-4 for m, i in zip(mags, init))  # the magnitude itself trained
    assert all(torch.equal(v, before[k]) for k, v in base_tensors(model).items())
    want = logits(model, "t")
    assert (want - logits(model, None)).abs().max() > 1e-3
    cfg = json.loads((tmp_path / "run" / CONFIG).read_text())
    assert cfg["use_dora"] is True
    pm = peft.PeftModel.from_pretrained(_hf(hf_small), str(tmp_path / "run")).eval()
    assert (_hf_logits(pm) - want).abs().max() <= TOL


def _peft_dora(hf_small, folder, seed=0):
    """A DoRA adapter made by PEFT: random non-zero B and magnitude; (its logits, its merge_and_unload logits)."""
    pm, want = peft_made(hf_small, folder, seed, use_dora=True, move_magnitude=True)
    return want, _hf_logits(pm.merge_and_unload())


def test_peft_made_dora_loads_here_and_merged_export_matches_peft_merge(hf_small, tmp_path):
    want, peft_merged = _peft_dora(hf_small, tmp_path / "pd")
    model = load_base(str(hf_small), device="cpu")
    name, lcfg, _ = load_adapter(model, tmp_path / "pd")
    assert lcfg.use_dora and lcfg.targets == TARGET_MODULES
    got = logits(model, name)
    assert (got - logits(model, None)).abs().max() > 1e-2
    assert (got - want).abs().max() <= TOL
    out = export_merged(model, name, tmp_path / "merged")
    assert (_hf_logits(_hf(out)) - peft_merged).abs().max() <= TOL
    assert (peft_merged - want).abs().max() <= TOL
    lib = Library(tmp_path / "lib")  # imported into the library, it stays a DoRA adapter PEFT reads back
    lib.import_path(tmp_path / "pd", "imp", base_cfg=model.config)
    assert next(e for e in lib.list() if e.name == "imp").variant == "DoRA"
    pm = peft.PeftModel.from_pretrained(_hf(hf_small), str(lib.path("imp"))).eval()
    assert (_hf_logits(pm) - want).abs().max() <= TOL


def test_saved_file_has_peft_keys(hf_small, tmp_path):
    model = load_base(str(hf_small), device="cpu")
    make_dora(model, "d", LoraConfig(r=2, alpha=4.0, targets=("attn.c_attn",), use_dora=True))
    save_adapter(model, "d", tmp_path / "d", LoraConfig(r=2, alpha=4.0, targets=("attn.c_attn",), use_dora=True),
                 str(hf_small))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "d" / WEIGHTS), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for i in range(model.config.n_layer):
        assert shapes[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_magnitude_vector"] == (
            3 * model.config.n_embd,)


def test_mixed_batch_with_dora_rows_equals_each_row_alone(tiny):
    make_dora(tiny, "d", LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"), use_dora=True), seed=1)
    make_dora(tiny, "e", LoraConfig(r=2, alpha=4.0, targets=("attn.c_proj",), use_dora=True), seed=2)
    lora.add_adapter(tiny, "p", LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",)), seed=3)  # a plain LoRA row too
    with torch.no_grad():
        for layer in lora.lora_layers(tiny).values():
            if layer.has("p"):
                layer.weights("p")[1].normal_(0, 0.05)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [1, 2, 3, 4, 5, 6], [7, 7, 8, 8, 9, 9]])
    names = ["d", None, "e", "p"]
    alone = torch.cat([logits(tiny, n, ids[i:i + 1]) for i, n in enumerate(names)])
    assert (alone[0] - logits(tiny, None, ids[:1])[0]).abs().max() > 1e-3
    mixed = logits(tiny, lora.make_route(tiny, names), ids)
    assert (mixed - alone).abs().max() <= 1e-5


def test_the_merged_copy_matches_the_forward_and_leaves_the_base_bit_exact(tiny):
    make_dora(tiny, "d", seed=4)
    before = base_tensors(tiny)
    want = logits(tiny, "d")
    merged = build(tiny.config, merged_state_dict(tiny, "d"))  # the merged export's weights
    assert (logits(merged, None) - want).abs().max() <= 1e-4
    after = base_tensors(tiny)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_blend_of_dora_adapters_is_refused(tiny, tmp_path):
    make_dora(tiny, "d", seed=5)
    state = lora.adapter_state_dict(tiny, "d")
    with pytest.raises(AdapterError, match="DoRA adapters cannot be blended"):
        blend_states([(state, DORA)], [1.0])


def test_cli_finetune_dora_writes_a_dora_adapter(prepared, tmp_path):
    from core.__main__ import main
    from cli_helpers import TINY_RUN
    assert main(["finetune", "--data", str(prepared), *TINY_RUN, "--library", str(tmp_path / "lib"),
                 "--output", "d", "--dora"]) == 0
    cfg = json.loads((tmp_path / "lib" / "d" / CONFIG).read_text())
    assert cfg["use_dora"] is True
    lib = Library(tmp_path / "lib")
    entry = next(e for e in lib.list() if e.name == "d")
    assert entry.variant == "DoRA"
    from studio.tabs.library import _detail_rows, table_rows  # the Library tab says so
    assert table_rows(None, [entry])[0][3].endswith("DoRA")
    assert ("Variant", "DoRA") in _detail_rows(lib.details("d"))


def test_train_form_dora_box_reaches_the_config_and_the_count():
    from studio.tabs.train import TrainForm, make_configs
    lcfg, _ = make_configs(TrainForm(dataset="x", dora=True))
    assert lcfg.use_dora
    assert not make_configs(TrainForm(dataset="x"))[0].use_dora
    with pytest.raises(ValueError, match="DoRA must be true or false"):
        make_configs(TrainForm(dataset="x", dora="yes"))


def test_a_dora_run_resumes_from_its_checkpoint(sample_ds, tmp_path):
    from core.model.weights import load_base as load
    lc = LoraConfig(r=2, alpha=4.0, targets=("attn.c_attn",), use_dora=True)
    train_solo(Trainer(load("tiny", device="cpu"), sample_ds, lc, quick(steps=4), "r", tmp_path / "run"))
    model = load("tiny", device="cpu")
    events = train_solo(Trainer(model, sample_ds, None, quick(steps=6), "r", tmp_path / "run",
                          resume=tmp_path / "run"))
    assert events[-1]["type"] == "done" and events[-1]["step"] == 6
    assert all(l.variant["r"].label == "DoRA" for l in lora.lora_layers(model).values() if l.has("r"))
    assert json.loads((tmp_path / "run" / CONFIG).read_text())["use_dora"] is True


def test_compare_through_the_engine_with_a_dora_column_equals_each_alone(tmp_path, tiny):
    from core.engine import Engine
    from core.generate.sampling import SamplingConfig
    lib = tmp_path / "lib"
    make_dora(tiny, "d", LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"), use_dora=True), seed=6)
    lora.add_adapter(tiny, "x", LoraConfig(r=2, alpha=4.0, targets=("attn.c_proj",)), seed=7)
    with torch.no_grad():
        for layer in lora.lora_layers(tiny).values():
            if layer.has("x"):
                layer.weights("x")[1].normal_(0, 0.5)
    eng = Engine("cpu", lib)
    eng.base("tiny")
    eng.library.save(tiny, "d", "d", LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"), use_dora=True),
                     "tiny")
    eng.library.save(tiny, "x", "x", LoraConfig(r=2, alpha=4.0, targets=("attn.c_proj",)), "tiny")
    cfg = SamplingConfig(max_new_tokens=16, seed=1, stop_at_eot=False, temperature=0.0, top_k=50, top_p=1.0)

    def run(adapters):
        out = None
        for out in eng.compare("The quick brown fox", adapters, cfg, user="u"):
            pass
        return list(out)

    together = run([None, "d", "x"])
    assert together[1] != together[0]  # the DoRA adapter changes the text
    assert together == [run([None])[0], run(["d"])[0], run(["x"])[0]]


def test_dora_runs_co_batched_equal_each_alone(sample_ds, tmp_path):
    from core.model.weights import load_base as load
    from core.train.loop import TrainLoop
    jobs = {"d": (LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"), dropout=0.1, use_dora=True),
                  quick(steps=3, batch_size=2, seq_len=16, grad_accum=1, eval_interval=0, checkpoint_interval=0,
                        seed=1)),
            "p": (LoraConfig(r=2, alpha=4.0, targets=("attn.c_attn",)),
                  quick(steps=3, batch_size=1, seq_len=24, grad_accum=2, eval_interval=0, checkpoint_interval=0,
                        seed=2))}
    alone = {}
    for n, (lc, tc) in jobs.items():
        model = load("tiny", device="cpu")
        events = train_solo(Trainer(model, sample_ds, lc, tc, n, tmp_path / "alone" / n))
        alone[n] = ([e["loss"] for e in events if e["type"] == "step"], lora.adapter_state_dict(model, n))
    model = load("tiny", device="cpu")
    co, events = TrainLoop(model), {n: [] for n in jobs}
    for n, (lc, tc) in jobs.items():
        co.join(Trainer(model, sample_ds, lc, tc, n, tmp_path / "co" / n), events[n].append)
    while co.live:
        co.step()
    for n in jobs:
        losses = [e["loss"] for e in events[n] if e["type"] == "step"]
        assert len(losses) == 3 and max(abs(a - b) for a, b in zip(losses, alone[n][0])) <= 1e-5
        got = lora.adapter_state_dict(model, n)
        assert got.keys() == alone[n][1].keys()
        for k, v in alone[n][1].items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0)
    assert any(k.endswith("lora_magnitude_vector") for k in alone["d"][1])


def test_cli_refuses_dora_on_a_quantized_base(prepared, tmp_path, capsys):
    from cli_helpers import one_line_error
    argv = ["finetune", "--data", prepared, "--model", "tiny", "--library", tmp_path / "lib", "--dora",
            "--quantize", "int8"]
    assert "DoRA needs the full-precision base weights; load the base unquantized" in one_line_error(capsys, argv)
    assert not (tmp_path / "lib").exists()


def test_dora_with_rslora_lora_plus_and_a_rank_pattern_trains_and_loads_in_peft(hf_small, sample_ds, tmp_path):
    lc = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"), use_dora=True, use_rslora=True,
                    loraplus_lr_ratio=16.0, rank_pattern={"h.0.attn.c_attn": 2}, init="gaussian")
    model = load_base(str(hf_small), device="cpu")
    trainer = Trainer(model, sample_ds, lc, quick(steps=4), "t", tmp_path / "run", base_id=str(hf_small))
    events = train_solo(trainer)
    assert events[-1]["type"] == "done", events[-1]
    layers = [l for l in lora.lora_layers(model).values() if l.has("t")]
    groups = lora.lora_param_groups(model, "t", 1e-3, 16.0)
    mags = {id(l.lora_magnitude_vector[l.keys["t"]]) for l in layers}
    assert mags <= {id(p) for p in groups[1]["params"]}  # LoRA+: magnitudes learn at B's rate, as in PEFT
    assert sum(p.numel() for g in groups for p in g["params"]) == lora.count_lora_params(
        model.config, lc.r, lc.targets, lc)
    want = logits(model, "t")
    assert (want - logits(model, None)).abs().max() > 1e-3
    cfg = json.loads((tmp_path / "run" / CONFIG).read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True and cfg["rank_pattern"] == {"h.0.attn.c_attn": 2}
    pm = peft.PeftModel.from_pretrained(_hf(hf_small), str(tmp_path / "run")).eval()
    assert (_hf_logits(pm) - want).abs().max() <= TOL
    again = load_base(str(hf_small), device="cpu")  # saved == loaded, here too
    name, back, _ = load_adapter(again, tmp_path / "run")
    assert back.use_dora and (logits(again, name) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dora_from_a_principal_start_is_refused_with_what_to_choose(init):
    with pytest.raises(ValueError, match=f"DoRA cannot start from {init} initialisation; choose kaiming or gaussian"):
        LoraConfig(use_dora=True, init=init).validate()


def test_a_dora_adapter_on_a_quantized_base_is_refused_and_nothing_of_it_stays_loaded(tiny, tmp_path):
    from core.model.quant import quantize_base
    make_dora(tiny, "d", seed=3)
    save_adapter(tiny, "d", tmp_path / "d", DORA, "tiny")
    lora.remove_adapter(tiny, "d")
    quantize_base(tiny, "int8")
    with pytest.raises(ValueError, match="DoRA needs the full-precision base weights; load the base unquantized"):
        load_adapter(tiny, tmp_path / "d")
    assert lora.adapter_names(tiny) == []
    assert all(not l.lora_A and not l.keys for l in lora.lora_layers(tiny).values())
