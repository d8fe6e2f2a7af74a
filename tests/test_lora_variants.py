"""LoRA variants (rsLoRA, gaussian/PiSSA/OLoRA initialisation, LoRA+, per-module ranks and alphas) are
PEFT's: trained here they load in PEFT with the same logits, PEFT's own load here, merged exports match
PEFT's merge_and_unload, and PiSSA/OLoRA never modify the shared base. Small random GPT-2 in HF format."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft_helpers import hf as _hf, hf_logits as _hf_logits, peft_made  # noqa: E402
from adapter_helpers import IDS, base_tensors, logits, make_adapter  # noqa: E402
from core.adapters.export import export_merged, merged_state_dict  # noqa: E402
from core.adapters.format import CONFIG, META  # noqa: E402
from core.adapters.library import Library  # noqa: E402
from core.adapters.resolve import load_adapter  # noqa: E402
from core.lora.layers import (add_adapter, adapter_names, count_lora_params, lora_layers,  # noqa: E402
                              lora_parameters, make_route)
from core.lora.config import LoraConfig
from core.model.config import TARGET_MODULES
from core.model.weights import build, load_base  # noqa: E402
from core.train.trainer import Trainer  # noqa: E402
from train_helpers import quick, train_to_end  # noqa: E402

TOL = 1e-4
PATTERNS = dict(rank_pattern={"h.0.attn.c_attn": 4, "mlp.c_fc": 2}, alpha_pattern={"h.1.attn.c_proj": 4})
VARIANTS = {
    "rslora": dict(use_rslora=True),
    "gaussian": dict(init="gaussian"),
    "pissa": dict(init="pissa"),
    "olora": dict(init="olora"),
    "patterns": PATTERNS,
    "patterns+rslora": dict(PATTERNS, use_rslora=True),
    "loraplus": dict(loraplus_lr_ratio=16.0),
}


def _lc(**kw) -> LoraConfig:
    return LoraConfig(r=8, alpha=16.0, targets=TARGET_MODULES, **kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trained_here_loads_in_peft(hf_small, sample_ds, tmp_path, variant):
    """A few steps of training, saved, then PEFT on the ORIGINAL base gives the trained model's logits;
    the shared base in this process is bit-identical to before (PiSSA/OLoRA never write it)."""
    model = load_base(str(hf_small), device="cpu")
    before = base_tensors(model)
    base = logits(model, None)
    lc = _lc(**VARIANTS[variant])
    train_to_end(Trainer(model, sample_ds, lc, quick(steps=3), "a", tmp_path / "run", base_id=str(hf_small)))
    got = logits(model, "a")
    assert (got - base).abs().max() > 1e-3  # training changed the output
    after = base_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = json.loads((tmp_path / "run" / CONFIG).read_text())
    assert saved["use_rslora"] is lc.use_rslora
    if lc.init in ("pissa", "olora"):  # PEFT's converted form: a plain LoRA of rank 2r on the original base
        assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (16, 32, True)
    if lc.rank_pattern:
        assert saved["rank_pattern"] == lc.rank_pattern and saved["alpha_pattern"] == lc.alpha_pattern
    pm = peft.PeftModel.from_pretrained(_hf(hf_small), str(tmp_path / "run")).eval()
    assert (_hf_logits(pm) - got).abs().max() <= TOL
    export_merged(model, "a", tmp_path / "merged")  # merged here = PEFT's own merge of the saved file
    assert (_hf_logits(_hf(tmp_path / "merged")) - _hf_logits(pm.merge_and_unload())).abs().max() <= TOL
    # and back here from the file: the same function
    again = load_base(str(hf_small), device="cpu")
    name, _, meta = load_adapter(again, tmp_path / "run", "back")
    assert (logits(again, name) - got).abs().max() <= TOL
    assert (meta["lora"]["init"], meta["lora"]["r"], meta["lora"]["loraplus_lr_ratio"]) == (
        lc.init, 8, lc.loraplus_lr_ratio)  # studio.json keeps the run's own settings
    if lc.init in ("pissa", "olora"):  # its checkpoints hold the converted file, not A and B alone
        with pytest.raises(ValueError, match=f"a {lc.init} run cannot be resumed"):
            Trainer(model, sample_ds, None, quick(steps=5), "a", tmp_path / "run", resume=tmp_path / "run")




PEFT_OPTIONS = {
    "rslora": dict(use_rslora=True),
    "gaussian": dict(init_lora_weights="gaussian"),
    "patterns": dict(rank_pattern={"h.0.attn.c_attn": 4, "mlp.c_fc": 2}, alpha_pattern={"h.1.attn.c_proj": 4}),
    "patterns+rslora": dict(rank_pattern={"c_attn": 2}, alpha_pattern={"c_fc": 3}, use_rslora=True),
}


@pytest.mark.parametrize("option", list(PEFT_OPTIONS))
def test_peft_made_adapter_loads_here_and_merges_like_peft(hf_small, tmp_path, option):
    pm, want = peft_made(hf_small, tmp_path / "p", **PEFT_OPTIONS[option])
    model = load_base(str(hf_small), device="cpu")
    name, lcfg, _ = load_adapter(model, tmp_path / "p")
    got = logits(model, name)
    assert (got - logits(model, None)).abs().max() > 1e-2
    assert (got - want).abs().max() <= TOL
    export_merged(model, name, tmp_path / "merged")
    theirs = _hf_logits(pm.merge_and_unload())
    assert (_hf_logits(_hf(tmp_path / "merged")) - theirs).abs().max() <= TOL
    # saved again from here (the library), PEFT reads the same adapter
    lib = Library(tmp_path / "lib")
    lib.save(model, name, "copy", lcfg, str(hf_small))
    pm2 = peft.PeftModel.from_pretrained(_hf(hf_small), str(lib.path("copy"))).eval()
    assert (_hf_logits(pm2) - want).abs().max() <= TOL


def test_peft_converted_pissa_adapter_loads_here(hf_small, tmp_path):
    """PEFT's own PiSSA run saved with path_initial_model_for_weight_conversion: a rank-2r LoRA of the
    original base, which loads here like any LoRA with PEFT's logits."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn"], init_lora_weights="pissa")
    pm = peft.get_peft_model(_hf(hf_small), cfg)
    pm.save_pretrained(str(tmp_path / "init"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval()
    want = _hf_logits(pm)
    pm.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = load_base(str(hf_small), device="cpu")
    name, lcfg, _ = load_adapter(model, tmp_path / "out")
    assert lcfg.r == 8
    assert (logits(model, name) - logits(model, None)).abs().max() > 1e-2
    assert (logits(model, name) - want).abs().max() <= TOL


def test_pissa_starts_where_peft_starts(hf_small):
    """The same A and B as PEFT's pissa_init, and the adapter starts as exactly the base function."""
    model = load_base(str(hf_small), device="cpu")
    base = logits(model, None)
    add_adapter(model, "p", LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",), init="pissa"))
    assert (logits(model, "p") - base).abs().max() <= TOL
    cfg = peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn"], init_lora_weights="pissa")
    pm = peft.get_peft_model(_hf(hf_small), cfg)
    theirs = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    layer = lora_layers(model)["transformer.h.1.attn.c_attn"]
    A, B = layer.trainable("p")
    tA = theirs["base_model.model.transformer.h.1.attn.c_attn.lora_A.default.weight"]
    tB = theirs["base_model.model.transformer.h.1.attn.c_attn.lora_B.default.weight"]
    # singular vectors are defined up to sign: compare the products, then each factor up to sign
    assert torch.allclose(B @ A, tB @ tA, atol=1e-5)
    assert torch.allclose(A.abs(), tA.abs(), atol=1e-5) and torch.allclose(B.abs(), tB.abs(), atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_merged_copy_is_exact_and_the_base_untouched(hf_small, init):
    model = load_base(str(hf_small), device="cpu")
    before = base_tensors(model)
    lc = _lc(init=init)
    make_adapter(model, "p", lc, seed=1)  # A and B moved away from their start
    want = logits(model, "p")
    assert (want - logits(model, None)).abs().max() > 1e-2
    merged = build(model.config, merged_state_dict(model, "p"))  # the merged export's weights
    assert (logits(merged) - want).abs().max() <= TOL
    after = base_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # trainable parameters: r x (in + out) per module, not the frozen start
    assert sum(p.numel() for p in lora_parameters(model, "p")) == count_lora_params(model.config, 8, TARGET_MODULES, lc)


def test_gaussian_init_draws_a_with_std_one_over_r(hf_small):
    model = load_base(str(hf_small), device="cpu")
    add_adapter(model, "g", LoraConfig(r=8, alpha=16.0, targets=("mlp.c_fc",), init="gaussian"))
    A, B = lora_layers(model)["transformer.h.0.mlp.c_fc"].trainable("g")
    assert abs(float(A.detach().std()) - 1 / 8) < 0.02 and not B.any()


def test_loraplus_gives_b_ratio_times_the_learning_rate(tiny, sample_ds, tmp_path):
    """B's group runs at ratio x lr; with B = 0 at the start, Adam's first step moves each B entry by
    lr_B (its update is g/|g|), so the largest move measures the rate B really got."""
    lc = LoraConfig(r=4, alpha=8.0, loraplus_lr_ratio=16.0)
    tr = Trainer(tiny, sample_ds, lc, quick(steps=1, lr=1e-4, grad_accum=1), "a", tmp_path / "run")
    tr.setup()
    opt = tr._prepared.opt
    As, Bs = opt.param_groups[0]["params"], opt.param_groups[1]["params"]
    assert {id(p) for p in As} == {id(l.trainable("a")[0]) for l in lora_layers(tiny).values()}
    assert {id(p) for p in Bs} == {id(l.trainable("a")[1]) for l in lora_layers(tiny).values()}
    a0 = [p.detach().clone() for p in As]
    train_to_end(tr)
    assert opt.param_groups[1]["lr"] == pytest.approx(16 * opt.param_groups[0]["lr"])
    moved_b = max(float(p.abs().max()) for p in Bs)
    assert moved_b == pytest.approx(16 * 1e-4, rel=1e-3)
    # A's gradient is zero while B = 0: only weight decay touched it, at A's own (1x) rate
    moved_a = max(float((p - q).abs().max()) for p, q in zip(As, a0))
    assert moved_a < 1e-6


def test_mixed_batch_with_pattern_adapters_equals_each_row_alone(hf_small):
    model = load_base(str(hf_small), device="cpu")
    make_adapter(model, "p", _lc(**PATTERNS), seed=1)
    make_adapter(model, "q", _lc(use_rslora=True, init="pissa"), seed=2)
    ids = torch.cat([IDS, IDS[:1]])
    mixed = logits(model, make_route(model, ["p", "q", None]), ids)
    for i, n in enumerate(["p", "q", None]):
        alone = logits(model, n, ids[i:i + 1])
        assert (mixed[i] - alone[0]).abs().max() <= TOL
    assert (mixed[0] - mixed[2]).abs().max() > 1e-2  # the rows really differ


def test_pattern_ranks_and_parameter_count(hf_small):
    model = load_base(str(hf_small), device="cpu")
    lc = _lc(**PATTERNS)
    add_adapter(model, "p", lc)
    layers = lora_layers(model)
    assert layers["transformer.h.0.attn.c_attn"].trainable("p")[0].shape[0] == 4
    assert layers["transformer.h.1.attn.c_attn"].trainable("p")[0].shape[0] == 8
    assert layers["transformer.h.1.mlp.c_fc"].trainable("p")[0].shape[0] == 2
    assert layers["transformer.h.1.attn.c_proj"].scaling["p"] == 4 / 8
    n = sum(p.numel() for p in lora_parameters(model, "p"))
    plain = count_lora_params(model.config, 8, TARGET_MODULES)
    assert n == count_lora_params(model.config, 8, TARGET_MODULES, lc) < plain


@pytest.mark.parametrize("bad,message", [
    (dict(rank_pattern={"h.9.attn.c_attn": 4}), r"rank_pattern: 'h\.9\.attn\.c_attn' names no wrapped module"),
    (dict(alpha_pattern={"mlp.c_fc": 4}), r"alpha_pattern: 'mlp\.c_fc' names no wrapped module"),
    (dict(rank_pattern={"c_attn": 0}), r"rank_pattern: 'c_attn' -> 0; the rank must be a whole number"),
    (dict(init="lora-ga"), r"unknown LoRA initialisation 'lora-ga'"),
    (dict(loraplus_lr_ratio=0), r"LoRA\+ learning-rate ratio must be"),
])
def test_bad_variant_settings_are_refused_and_nothing_changes(tiny, bad, message):
    before = base_tensors(tiny)
    with pytest.raises(ValueError, match=message):
        add_adapter(tiny, "x", LoraConfig(r=4, alpha=8.0, **bad))
    assert adapter_names(tiny) == [] and not lora_layers(tiny)
    after = base_tensors(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)


# keys PEFT reads one way and the regex package another (fuzzy matching, POSIX classes), PEFT's own errors
# (a global flag inside its wrapper), and plain keys both read alike
PARITY_KEYS = ["c_attn", "h.0.attn.c_attn", r"h\.[01]\.mlp\.c_(fc|proj)", "attn.*", "c_at{1,2}n", "(?i:C_ATTN)",
               "h.1.attn.c_attn|mlp.c_fc", r"\d\.attn\.c_proj", "c_attn{e<=30}", "(c_fc){e<=2}", "(?:mlp.c_fc){i<=3}",
               "[[:alpha:]_.]+", "(?i)c_attn", r"h.[\d]+.attn.c_attn", "h.0.*(?<!proj)"]


@pytest.mark.parametrize("key", PARITY_KEYS)
def test_a_rank_pattern_selects_exactly_the_modules_peft_selects_or_is_refused(key):
    from peft.utils.other import get_pattern_key
    from core.lora.patterns import module_names, pattern_key
    modules = module_names(2, TARGET_MODULES)
    try:
        peft_picks = [m for m in modules if get_pattern_key([key], m) == key]
    except Exception:  # noqa: BLE001 - PEFT cannot read the key at all
        peft_picks = None
    try:
        ours = [m for m in modules if pattern_key([key], m) == key]
    except ValueError:  # refused: only a key PEFT would apply to no module, or could not read
        assert not peft_picks
        with pytest.raises(ValueError, match="rank_pattern: "):
            LoraConfig(r=4, rank_pattern={key: 2}).validate()
        return
    assert ours == peft_picks


def test_library_shows_mixed_ranks(hf_small, tmp_path):
    model = load_base(str(hf_small), device="cpu")
    lc = _lc(**PATTERNS)
    make_adapter(model, "p", lc)
    lib = Library(tmp_path / "lib")
    lib.save(model, "p", "mixed", lc, str(hf_small))
    entry = next(e for e in lib.list() if e.name == "mixed")
    assert entry.rank == "mixed" and "h.0.attn.c_attn: 4" in entry.rank_detail and "default 8" in entry.rank_detail
    assert json.loads((lib.path("mixed") / META).read_text())["lora"]["rank_pattern"] == PATTERNS["rank_pattern"]


def test_cli_trains_with_variant_flags(prepared, tmp_path, capsys):
    from cli_helpers import TINY_RUN
    from core.__main__ import main
    rc = main(["finetune", "--data", str(prepared), *TINY_RUN, "--library", str(tmp_path / "lib"), "--output", "v",
               "--targets", "c_attn,c_fc", "--rslora", "--loraplus-lr-ratio", "4",
               "--rank-pattern", '{"h.0.attn.c_attn": 2}', "--alpha-pattern", '{"c_fc": 4}'])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "lib" / "v" / CONFIG).read_text())
    assert (saved["use_rslora"], saved["rank_pattern"], saved["alpha_pattern"]) == (True, {"h.0.attn.c_attn": 2},
                                                                                    {"c_fc": 4})
    meta = json.loads((tmp_path / "lib" / "v" / META).read_text())
    assert meta["lora"]["loraplus_lr_ratio"] == 4 and meta["val_loss"] < meta["start_val_loss"]


@pytest.mark.parametrize("args,expect", [
    (["--rank-pattern", '{"h.5.attn.c_attn": 4}'], "rank_pattern: 'h.5.attn.c_attn' names no wrapped module"),
    (["--rank-pattern", "{h.0: 4"], "--rank-pattern must be a JSON object"),
    (["--alpha-pattern", '{"c_attn": -1}'], "the alpha must be a positive number"),
    (["--init", "pissa", "--quantize", "nf4"], "pissa initialisation needs the full-precision base weights"),
])
def test_cli_refuses_bad_variant_flags(prepared, tmp_path, capsys, args, expect):
    from cli_helpers import one_line_error
    argv = ["finetune", "--data", prepared, "--model", "tiny", "--library", tmp_path / "lib", *args]
    assert expect in one_line_error(capsys, argv)
    assert not (tmp_path / "lib").exists()  # nothing was written


def test_estimate_counts_per_module_ranks_and_the_frozen_start():
    from core.model.config import PRESETS
    from core.train.config import TrainConfig
    from core.train.estimate import estimate_training
    cfg, tc = PRESETS["tiny"], TrainConfig(batch_size=2, seq_len=32)
    plain = estimate_training(cfg, LoraConfig(r=8, targets=TARGET_MODULES), tc)
    mixed = estimate_training(cfg, LoraConfig(r=8, targets=TARGET_MODULES, **PATTERNS), tc)
    pissa = estimate_training(cfg, LoraConfig(r=8, targets=TARGET_MODULES, init="pissa"), tc)
    assert mixed.trainable_params == count_lora_params(cfg, 8, TARGET_MODULES, LoraConfig(r=8, targets=TARGET_MODULES,
                                                                                         **PATTERNS))
    assert mixed.trainable_params < plain.trainable_params == pissa.trainable_params
    assert pissa.adapter_bytes - 2048 == 2 * (plain.adapter_bytes - 2048)  # the saved file is rank 2r


def test_blending_a_pattern_adapter_is_refused_and_nothing_changes(hf_small, tmp_path):
    from core.adapters.validate import AdapterError
    model = load_base(str(hf_small), device="cpu")
    lib = Library(tmp_path / "lib")
    for name, lc in (("mixed", _lc(**PATTERNS)), ("plain", _lc())):
        make_adapter(model, name, lc)
        lib.save(model, name, name, lc, str(hf_small))
    before = [e.name for e in lib.list()]
    with pytest.raises(AdapterError, match=r"'mixed' has per-module ranks or alphas"):
        lib.blend(["plain", "mixed"], [0.5, 0.5], "both")
    assert [e.name for e in lib.list()] == before


def test_loraplus_steps_equal_a_hand_built_torch_optimizer(sample_ds, tmp_path):
    """Two trainer steps equal two steps of a torch AdamW built by hand with B's group at ratio x lr, on
    the same batches (the second step moves A too, since B is no longer zero)."""
    import numpy as np
    import torch.nn.functional as F
    from core.train.trainer import get_batch, lr_at
    lc = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"), loraplus_lr_ratio=16.0)
    tc = quick(steps=2, grad_accum=1, lr=1e-3, eval_interval=0)
    ours = load_base("tiny", device="cpu")
    train_to_end(Trainer(ours, sample_ds, lc, tc, "a", tmp_path / "run"))
    hand = load_base("tiny", device="cpu")
    add_adapter(hand, "a", lc, seed=tc.seed)
    layers = [l for l in lora_layers(hand).values() if l.has("a")]
    A = [l.trainable("a")[0] for l in layers]
    B = [l.trainable("a")[1] for l in layers]
    opt = torch.optim.AdamW([{"params": A, "lr": tc.lr}, {"params": B, "lr": tc.lr * 16}],
                            weight_decay=tc.weight_decay)
    rng = np.random.default_rng(tc.seed)
    for step in range(tc.steps):
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr_at(step, tc), 16 * lr_at(step, tc)
        x, y = get_batch(sample_ds.train, tc.batch_size, tc.seq_len, rng, hand.device)
        out = hand(x, "a")
        F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(A + B, tc.grad_clip)
        opt.step()
        opt.zero_grad()
    mine = [p for l in lora_layers(ours).values() if l.has("a") for p in l.trainable("a")]
    assert max(float((p - q).abs().max()) for p, q in zip(mine, [p for ab in zip(A, B) for p in ab])) <= 1e-6
    assert max(float(b.abs().max()) for b in B) > 1e-3  # the steps moved B


def test_variant_jobs_co_batched_on_one_base_equal_each_alone(sample_ds, tmp_path):
    """PiSSA + LoRA+, patterns + rsLoRA and gaussian jobs trained together on one shared base end where
    each ends alone, and the shared base is bit-identical afterwards (PiSSA never writes it)."""
    from core.lora.layers import adapter_state_dict
    from core.train.loop import TrainLoop
    jobs = {"p": (_lc(init="pissa", loraplus_lr_ratio=8.0), quick(steps=3, seed=1, eval_interval=0)),
            "q": (_lc(**PATTERNS, use_rslora=True), quick(steps=2, seed=2, eval_interval=0, grad_accum=1)),
            "g": (_lc(init="gaussian"), quick(steps=3, seed=3, eval_interval=0, seq_len=16))}
    want = {}
    for n, (lc, tc) in jobs.items():
        model = load_base("tiny", device="cpu")
        train_to_end(Trainer(model, sample_ds, lc, tc, n, tmp_path / "alone" / n))
        want[n] = adapter_state_dict(model, n)
    model = load_base("tiny", device="cpu")
    before = base_tensors(model)
    co = TrainLoop(model)
    for n, (lc, tc) in jobs.items():
        co.join(Trainer(model, sample_ds, lc, tc, n, tmp_path / "together" / n), lambda ev: None)
    widths = []
    while co.live:
        widths.append(len(co.runs))
        co.step()
    assert max(widths) == 3
    for n in jobs:
        got = adapter_state_dict(model, n)
        assert got.keys() == want[n].keys()
        assert max(float((got[k] - want[n][k]).abs().max()) for k in got) <= 1e-5
    after = base_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
