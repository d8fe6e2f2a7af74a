"""--precision auto|fp32|bf16: the frozen base's dtype. auto is bf16 only where the device computes it
natively (a CPU with AVX-512 BF16 or AMX, Apple M2+, a CUDA GPU with bf16), else fp32, so on CPUs without
it nothing changes bit for bit. With a bf16 base, LoRA weights and optimizer state stay fp32, the base is
never written, training follows the fp32 run within bf16 rounding, and the adapter it saves is an
ordinary fp32 adapter."""
from __future__ import annotations

import json

import pytest
import torch

from adapter_helpers import base_tensors
from core.device import cpu_has_native_bf16, precision_dtype
from core.lora.layers import add_adapter, lora_layers, lora_parameters
from core.lora.config import LoraConfig
from core.model.weights import load_base
from core.train.trainer import Trainer
from train_helpers import quick, train_solo

CPU = torch.device("cpu")
XEON_SPR = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
LC = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"))


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16(XEON_SPR) and cpu_has_native_bf16(ZEN4)
    assert not cpu_has_native_bf16(SKYLAKE)  # AVX-512 without its BF16 extension: emulated, slower than fp32


def test_auto_picks_bf16_only_on_cpus_that_compute_it_natively():
    assert precision_dtype("auto", CPU, native_bf16=True) == torch.bfloat16
    assert precision_dtype("auto", CPU, native_bf16=False) == torch.float32
    assert precision_dtype("fp32", CPU, native_bf16=True) == torch.float32
    assert precision_dtype("bf16", CPU, native_bf16=False) == torch.bfloat16  # asked for: given, even if slower
    assert precision_dtype("auto", CPU) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose auto, fp32 or bf16"):
        precision_dtype("fp16", CPU)


def _trained(dtype, sample_ds, out):
    model = load_base("tiny", "cpu", dtype)
    before = {k: v.clone() for k, v in base_tensors(model).items()}
    events = train_solo(Trainer(model, sample_ds, LC, quick(steps=6), "t", out))
    assert events[-1]["type"] == "done", events[-1]
    return model, before, events


def test_a_bf16_base_trains_fp32_lora_like_the_fp32_run(sample_ds, tmp_path):
    m16, before, ev16 = _trained(torch.bfloat16, sample_ds, tmp_path / "b")
    m32, _, ev32 = _trained(torch.float32, sample_ds, tmp_path / "f")
    assert m16.transformer.h[0].attn.c_attn.base.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_parameters(m16, "t"))  # LoRA and AdamW state in fp32
    assert all(torch.equal(v, before[k]) for k, v in base_tensors(m16).items())  # the base is never written
    moved = max((l.weights("t")[1].abs().max().item() for l in lora_layers(m16).values() if l.has("t")))
    assert moved > 1e-4  # the adapter trained
    losses = lambda ev: [e["loss"] for e in ev if e["type"] == "step"]  # noqa: E731
    vals = lambda ev: [e["val_loss"] for e in ev if e["type"] == "eval"]  # noqa: E731
    assert len(losses(ev16)) == 6
    for a, b in zip(losses(ev16) + vals(ev16), losses(ev32) + vals(ev32)):
        assert abs(a - b) <= 1e-2 * abs(b)  # bf16 rounding of the frozen path, not another run
    saved = load_base("tiny", "cpu")  # what it saved is an ordinary fp32 adapter that loads on an fp32 base
    from core.adapters.resolve import load_adapter
    name, lcfg, _ = load_adapter(saved, tmp_path / "b")
    assert lcfg.r == 4 and all(p.dtype == torch.float32 for p in lora_parameters(saved, name))


def test_fp32_stays_bit_exact_with_the_flag(sample_ds, tmp_path):
    _, _, plain = _trained(None, sample_ds, tmp_path / "default")  # this machine's default
    _, _, fp32 = _trained(precision_dtype("fp32", CPU), sample_ds, tmp_path / "fp32")
    if not cpu_has_native_bf16():
        assert [e.get("loss") for e in plain if e["type"] == "step"] == \
            [e.get("loss") for e in fp32 if e["type"] == "step"]


def test_a_bf16_base_generates_close_to_the_fp32_one():
    ids = torch.tensor([[15496, 995, 11, 340, 318]])
    m32, m16 = load_base("tiny", "cpu"), load_base("tiny", "cpu", torch.bfloat16)
    for m in (m32, m16):
        add_adapter(m, "a", LC, seed=1)
        for layer in lora_layers(m).values():
            layer.weights("a")[1].data.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = m32(ids, "a").float(), m16(ids, "a").float()
    assert (a - b).abs().max() / a.abs().max() < 3e-2


def test_cli_finetune_and_compare_take_the_flag(prepared, tmp_path, capsys):
    from cli_helpers import TINY_RUN
    from core.__main__ import main
    lib = tmp_path / "lib"
    assert main(["finetune", "--data", str(prepared), *TINY_RUN, "--library", str(lib), "--output", "b",
                 "--precision", "bf16"]) == 0
    assert "on cpu, bfloat16" in capsys.readouterr().out
    assert json.loads((lib / "b" / "adapter_config.json").read_text())["r"] == 8
    assert main(["compare", "--lora", "b", "--library", str(lib), "--prompts", "Ahoy", "--samples", "1",
                 "--max-tokens", "4", "--precision", "bf16", "--model", "tiny"]) == 0
    captured = capsys.readouterr()
    assert "on cpu, bfloat16" in captured.out and "Ahoy" in captured.out


def test_the_studio_shows_the_precision_and_estimates_with_it(tmp_path):
    from studio.app import create_studio, header_html
    from studio.tabs.train import TrainForm, estimate_md
    s16 = create_studio(tmp_path / "lib", tmp_path / "ds", "cpu", "tiny", precision="bf16")
    s32 = create_studio(tmp_path / "lib", tmp_path / "ds", "cpu", "tiny", precision="fp32")
    assert "precision: bf16 base, fp32 LoRA" in header_html(s16)
    assert "precision: fp32 base, fp32 LoRA" in header_html(s32)
    form = TrainForm(model="gpt2")
    e16, e32 = estimate_md(s16, form), estimate_md(s32, form)
    assert "(bf16 base, fp32 LoRA)" in e16 and "(fp32 base, fp32 LoRA)" in e32
    from core.train.estimate import estimate_training
    from core.model.config import PRESETS
    from core.train.config import TrainConfig
    a = estimate_training(PRESETS["gpt2"], LoraConfig(), TrainConfig(), "cpu", weights="bf16")
    b = estimate_training(PRESETS["gpt2"], LoraConfig(), TrainConfig(), "cpu", weights="fp32")
    assert a.weights_bytes * 2 == b.weights_bytes and a.activation_bytes < b.activation_bytes


def test_merge_reads_auto_as_fp32_so_an_export_is_not_rounded(monkeypatch):
    import core.device
    from core.__main__ import _dtype, build_parser
    monkeypatch.setattr(core.device, "cpu_has_native_bf16", lambda: True)  # a CPU where auto means bf16
    finetune = build_parser().parse_args(["finetune", "--data", "d", "--device", "cpu"])
    assert _dtype(finetune) == torch.bfloat16
    merge = build_parser().parse_args(["merge", "--lora", "x", "--output", "o", "--device", "cpu"])
    assert _dtype(merge) == torch.float32
    forced = build_parser().parse_args(["merge", "--lora", "x", "--output", "o", "--device", "cpu",
                                        "--precision", "bf16"])
    assert _dtype(forced) == torch.bfloat16
