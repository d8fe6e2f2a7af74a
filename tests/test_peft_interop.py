"""The adapter format is PEFT's: adapters saved here load in PEFT with the same logits, PEFT's own
adapters load here, and a merged export loads in transformers. Small random GPT-2 (SMALL)."""
from __future__ import annotations

import zipfile

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft_helpers import hf as _hf, hf_logits as _hf_logits, peft_made  # noqa: E402
from adapter_helpers import logits, make_adapter  # noqa: E402
from core.adapters.library import Library
from core.adapters.export import export_merged
from core.adapters.resolve import load_adapter  # noqa: E402
from core.lora.config import LoraConfig
from core.model.config import TARGET_MODULES
from core.model.weights import load_base  # noqa: E402

TOL = 1e-4


def _ours(hf_small):
    return load_base(str(hf_small), device="cpu")


def test_adapter_saved_here_loads_in_peft(hf_small, tmp_path):
    model = _ours(hf_small)
    lc = LoraConfig(r=8, alpha=16.0, targets=TARGET_MODULES)
    make_adapter(model, "a", lc, seed=3)
    want = logits(model, "a")
    base = logits(model, None)
    assert (want - base).abs().max() > 1e-2  # the adapter matters
    lib = Library(tmp_path / "lib")
    lib.save(model, "a", "ours", lc, str(hf_small))
    hf = _hf(hf_small)
    assert (_hf_logits(hf) - base).abs().max() <= TOL  # same base to start with
    pm = peft.PeftModel.from_pretrained(hf, str(lib.path("ours"))).eval()
    assert (_hf_logits(pm) - want).abs().max() <= TOL


def _peft_adapter(hf_small, folder, seed=0):
    """An adapter made by PEFT itself: r=16 on c_attn, c_proj (both) and c_fc, random non-zero B."""
    return peft_made(hf_small, folder, seed, r=16, alpha=32)[1]


def test_adapter_made_by_peft_loads_here(hf_small, tmp_path):
    want = _peft_adapter(hf_small, tmp_path / "peft_out")
    model = _ours(hf_small)
    name, lcfg, meta = load_adapter(model, tmp_path / "peft_out")
    assert (name, lcfg.r, lcfg.alpha, lcfg.targets, meta) == ("peft_out", 16, 32.0, TARGET_MODULES, {})
    got = logits(model, name)
    assert (got - logits(model, None)).abs().max() > 1e-2
    assert (got - want).abs().max() <= TOL


def test_peft_folder_zipped_imports_with_its_readme(hf_small, tmp_path):
    want = _peft_adapter(hf_small, tmp_path / "peft_out", seed=1)
    z = tmp_path / "upload.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in (tmp_path / "peft_out").iterdir():
            zf.write(f, f"peft_out/{f.name}")
    assert "peft_out/README.md" in zipfile.ZipFile(z).namelist()
    model = _ours(hf_small)
    lib = Library(tmp_path / "lib")
    assert lib.import_path(z, "from_peft", base_cfg=model.config) == "from_peft"
    load_adapter(model, lib.path("from_peft"))
    assert (logits(model, "from_peft") - want).abs().max() <= TOL
    # and the library's copy still loads in PEFT
    pm = peft.PeftModel.from_pretrained(_hf(hf_small), str(lib.path("from_peft"))).eval()
    assert (_hf_logits(pm) - want).abs().max() <= TOL


def test_merged_export_loads_in_transformers(hf_small, tmp_path):
    model = _ours(hf_small)
    lc = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_proj"))
    make_adapter(model, "a", lc, seed=5)
    want = logits(model, "a")
    assert (want - logits(model, None)).abs().max() > 1e-2
    out = export_merged(model, "a", tmp_path / "merged")
    assert (_hf_logits(_hf(out)) - want).abs().max() <= TOL


def test_blend_loads_in_peft(hf_small, tmp_path):
    """A blend is an ordinary PEFT adapter (rank = sum of ranks, union of targets)."""
    model = _ours(hf_small)
    l1 = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",))
    l2 = LoraConfig(r=2, alpha=2.0, targets=("mlp.c_fc", "mlp.c_proj"))
    make_adapter(model, "x", l1, seed=1)
    make_adapter(model, "y", l2, seed=2)
    lib = Library(tmp_path / "lib")
    lib.save(model, "x", "x", l1, str(hf_small))
    lib.save(model, "y", "y", l2, str(hf_small))
    lib.blend(["x", "y"], [0.5, -2.0], "mix", model.config)
    load_adapter(model, lib.path("mix"))
    want = logits(model, "mix")
    assert (want - logits(model, None)).abs().max() > 1e-2
    pm = peft.PeftModel.from_pretrained(_hf(hf_small), str(lib.path("mix"))).eval()
    assert (_hf_logits(pm) - want).abs().max() <= TOL
