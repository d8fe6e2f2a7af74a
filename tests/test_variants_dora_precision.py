"""DoRA with the other LoRA variants, --precision through Start, the Train tab and exports, and pattern
regexes that must not freeze the studio: each test states a rule (tiny random models; PEFT is the reference
where it has one)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft_helpers import hf as _hf, hf_logits as _hf_logits, peft_made  # noqa: E402
from adapter_helpers import logits  # noqa: E402
from core.adapters.export import export_merged  # noqa: E402
from core.adapters.library import Library  # noqa: E402
from core.adapters.resolve import load_adapter  # noqa: E402
from core.lora import layers as lora  # noqa: E402
from core.lora.config import LoraConfig
from core.model.weights import load_base  # noqa: E402

TOL = 1e-4
DORA_PEFT = {
    "patterns": dict(rank_pattern={"h.0.attn.c_attn": 4, "mlp.c_fc": 2}, alpha_pattern={"h.1.attn.c_proj": 4}),
    "patterns+rslora": dict(rank_pattern={"c_attn": 2}, alpha_pattern={"c_fc": 3}, use_rslora=True),
    "rslora": dict(use_rslora=True),
}


@pytest.mark.parametrize("option", list(DORA_PEFT))
def test_peft_made_dora_with_variants_loads_merges_routes_and_lists_like_peft(hf_small, tmp_path, option):
    pm, want = peft_made(hf_small, tmp_path / "p", use_dora=True, move_magnitude=True, **DORA_PEFT[option])
    model = load_base(str(hf_small), device="cpu")
    name, lcfg, _ = load_adapter(model, tmp_path / "p")
    assert lcfg.use_dora
    base = logits(model, None)
    got = logits(model, name)
    assert (got - base).abs().max() > 1e-2
    assert (got - want).abs().max() <= TOL
    # mixed batch: row 0 the DoRA adapter, row 1 the base, each equal to its row alone
    mixed = logits(model, lora.make_route(model, [name, None]))
    assert (mixed[0] - got[0]).abs().max() <= 1e-5 and (mixed[1] - base[1]).abs().max() <= 1e-5
    export_merged(model, name, tmp_path / "merged")
    theirs = _hf_logits(pm.merge_and_unload())
    assert (_hf_logits(_hf(tmp_path / "merged")) - theirs).abs().max() <= TOL
    lib = Library(tmp_path / "lib")
    lib.import_path(tmp_path / "p", "imp", base_cfg=model.config)
    entry = next(e for e in lib.list() if e.name == "imp")
    assert entry.variant == "DoRA"
    pm2 = peft.PeftModel.from_pretrained(_hf(hf_small), str(lib.path("imp"))).eval()
    assert (_hf_logits(pm2) - want).abs().max() <= TOL


def test_a_dora_loraplus_run_resumed_equals_the_run_uninterrupted(sample_ds, tmp_path):
    from core.train.trainer import Trainer
    from train_helpers import quick, train_solo
    lc = LoraConfig(r=2, alpha=4.0, targets=("attn.c_attn", "mlp.c_fc"), use_dora=True, loraplus_lr_ratio=16.0,
                    rank_pattern={"h.0.mlp.c_fc": 4}, use_rslora=True, dropout=0.1)
    whole = load_base("tiny", device="cpu")
    train_solo(Trainer(whole, sample_ds, lc, quick(steps=6), "r", tmp_path / "whole"))
    cut = Trainer(load_base("tiny", device="cpu"), sample_ds, lc, quick(steps=6), "r", tmp_path / "part")
    # stopped after step 4: the same schedule as the whole run
    train_solo(cut, lambda ev: ev["type"] == "step" and ev["step"] == 4 and cut.stop.set())
    assert cut.step == 4
    part = load_base("tiny", device="cpu")
    events = train_solo(Trainer(part, sample_ds, None, quick(steps=6), "r", tmp_path / "part",
                          resume=tmp_path / "part"))
    assert events[-1]["type"] == "done" and events[-1]["step"] == 6
    a, b = lora.adapter_state_dict(whole, "r"), lora.adapter_state_dict(part, "r")
    assert a.keys() == b.keys() and any(k.endswith("lora_magnitude_vector") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


def test_a_run_the_bf16_studio_estimates_under_the_cap_is_not_refused_at_start(tmp_path):
    """--precision bf16 on a CPU: the Train tab's estimate counts a bf16 base and bf16 activations, so Start
    must hold the run to the same figure, not to an fp32 base's."""
    from dataclasses import replace
    from studio.app import create_studio
    from studio.tabs import train
    from studio_helpers import _form, _prepare, FAST
    from core.model.config import PRESETS
    from core.train.estimate import estimate_training, human_bytes
    probe = create_studio(tmp_path / "lib0", tmp_path / "ds0", "cpu", "tiny", precision="bf16")
    _prepare(probe)
    form = _form(model="tiny", dataset="pirates", name="fits", steps=2, **{**FAST, "batch": 64})
    lcfg, tcfg = train.make_configs(form)
    seq = probe.dataset_store.load("pirates").block_size(tcfg.seq_len)[0]
    tcfg = replace(tcfg, seq_len=seq)
    b16 = estimate_training(PRESETS["tiny"], lcfg, tcfg, "cpu", weights="bf16").peak_bytes
    b32 = estimate_training(PRESETS["tiny"], lcfg, tcfg, "cpu", weights="fp32").peak_bytes
    assert b16 < b32
    cap = (b16 + b32) // 2  # room for the bf16 run, not for an fp32 one
    studio = create_studio(tmp_path / "lib", tmp_path / "ds", "cpu", "tiny", precision="bf16", max_train_memory=cap)
    _prepare(studio)
    shown = train.estimate_md(studio, form)
    assert "(bf16 base, fp32 LoRA)" in shown and human_bytes(b16) in shown  # the page says it fits
    try:
        train.start(studio, form)  # refused here before the fix: MemoryLimitError with the fp32 figure
        job = studio.runs.find(None)
        assert job.wait(120) and job.state == "finished", job.message  # the trainer's own check agrees
    finally:
        studio.runs.stop_all(60)


def test_the_train_tabs_size_line_counts_the_rank_pattern_and_a_principal_start(tmp_path):
    """The size line under the LoRA settings ('N trainable parameters · adapter file ≈ X') must count what the
    form will train: a rank pattern changes the parameters, PiSSA/OLoRA save a rank-2r file."""
    from studio.app import create_studio
    from studio.tabs import train
    from core.model.config import PRESETS
    from core.train.config import TrainConfig
    from core.train.estimate import estimate_training, human_bytes
    studio = create_studio(tmp_path / "lib", tmp_path / "ds", "cpu", "tiny")
    targets = ["attn.c_attn", "mlp.c_fc"]
    for extra in (dict(rank_pattern={"mlp.c_fc": 16}), dict(init="pissa"), dict(use_dora=True, init="gaussian")):
        lcfg = LoraConfig(r=4, targets=tuple(targets), **extra)
        est = estimate_training(PRESETS["gpt2"], lcfg, TrainConfig(steps=1), "cpu")
        plain = estimate_training(PRESETS["gpt2"], LoraConfig(r=4, targets=tuple(targets)), TrainConfig(steps=1),
                                  "cpu")
        assert (est.trainable_params, est.adapter_bytes) != (plain.trainable_params, plain.adapter_bytes)
        shown = train.size_md(studio, "gpt2", targets, 4, extra.get("use_dora", False), extra.get("init", "kaiming"),
                              json.dumps(extra.get("rank_pattern", {})))
        assert f"**{est.trainable_params:,}** trainable" in shown and human_bytes(est.adapter_bytes) in shown, shown


def test_blending_a_dora_adapter_with_a_rank_pattern_says_dora_cannot_be_blended(tiny, tmp_path):
    """Dropping the pattern, as the pattern refusal advises, would not make a DoRA adapter blendable: the
    refusal must name the reason that holds."""
    from adapter_helpers import listing, make_adapter
    from core.adapters.validate import AdapterError
    lib = Library(tmp_path / "lib")
    for name, lc in (("d", LoraConfig(r=4, alpha=8.0, use_dora=True, rank_pattern={"h.0.attn.c_attn": 2})),
                     ("p", LoraConfig(r=4, alpha=8.0))):
        make_adapter(tiny, name, lc)
        lib.save(tiny, name, name, lc, "tiny")
    before = listing(lib)
    with pytest.raises(AdapterError, match="DoRA adapters cannot be blended"):
        lib.blend(["p", "d"], [0.5, 0.5], "both")
    assert listing(lib) == before


def test_the_train_form_refuses_an_rslora_value_that_is_not_true_or_false():
    """As for the DoRA box: an API client's 'yes' is refused, not trained as plain LoRA without a word."""
    from studio.tabs.train import TrainForm, make_configs
    assert make_configs(TrainForm(dataset="x", rslora=True))[0].use_rslora
    assert not make_configs(TrainForm(dataset="x", rslora=None))[0].use_rslora
    with pytest.raises(ValueError, match="rsLoRA must be true or false"):
        make_configs(TrainForm(dataset="x", rslora="yes"))


def test_a_studio_merged_export_is_not_rounded_to_bf16_by_precision_auto(tmp_path, monkeypatch):
    import core.device
    from safetensors.torch import load_file
    from adapter_helpers import make_adapter
    from core.adapters.export import merged_state_dict
    from studio.app import create_studio
    monkeypatch.setattr(core.device, "cpu_has_native_bf16", lambda: True)  # a CPU where auto means bf16
    studio = create_studio(tmp_path / "lib", tmp_path / "ds", "cpu", "tiny")
    assert studio.precision == "bf16"
    lc = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",))
    fp32 = load_base("tiny", device="cpu")
    make_adapter(fp32, "a", lc)
    assert (logits(fp32, "a") - logits(fp32, None)).abs().max() > 1e-3
    studio.library.save(fp32, "a", "a", lc, "tiny")
    studio.base("tiny")
    out = studio.engine.export_merged("a", tmp_path / "merged")
    got, want = load_file(str(out / "model.safetensors")), merged_state_dict(fp32, "a")
    assert all(torch.equal(got[k], want[k]) for k in want)  # what `python -m core merge` writes


HOSTILE = "(.*)*(.*)*y"  # nested quantifiers: re backtracks ~2^n over a 27-character module name (hours)
SLOW_TOO = r"(.|..)*[^\w.]"  # one that backtracks in the regex module too


def test_a_pattern_that_backtracks_for_hours_is_refused_quickly(tmp_path):
    """A rank pattern is a regex from a user (the Train tab, the start_training API, --rank-pattern) or from an
    uploaded adapter_config.json. Matching one like HOSTILE holds the GIL for hours: one request would freeze
    the whole studio. It must be refused in well under a second (a child process, so this test cannot hang)."""
    import subprocess
    import sys
    from pathlib import Path
    from adapter_helpers import lora_tensors, write_adapter
    from core.model.config import GPTConfig
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["attn.c_attn"],
              "rank_pattern": {HOSTILE: 2}}
    write_adapter(tmp_path / "up", lora_tensors(cfg, r=4), config=config)
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from core.adapters.validate import read_adapter
from core.lora.config import LoraConfig
from core.model.config import PRESETS, GPTConfig
for check in (lambda: LoraConfig(rank_pattern={{{HOSTILE!r}: 4}}).validate(PRESETS["gpt2"]),
              lambda: LoraConfig(rank_pattern={{{SLOW_TOO!r}: 4}}).validate(PRESETS["gpt2"]),
              lambda: read_adapter({str(tmp_path / "up")!r}, GPTConfig(n_layer=2, n_head=2, n_embd=64))):
    try:
        check()
        print("accepted")
    except ValueError as e:
        print("refused:", e)
"""
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30).stdout
    except subprocess.TimeoutExpired:
        pytest.fail("validating the pattern was still running after 30 s")
    assert out.count("refused:") == 3, out


def test_a_pattern_nested_thousands_deep_is_one_clear_line():
    from studio.tabs.train import TrainForm, make_configs
    deep = '{"a":' + '{"b":' * 5000 + '1' + '}' * 5001  # json.loads raises RecursionError on it
    with pytest.raises(ValueError, match=r"rank pattern must be a JSON object such as"):
        make_configs(TrainForm(dataset="x", rank_pattern=deep))
