"""Weight loading: local folders and files, the HF cache, and errors that name their cause."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.model.weights import WeightsError, load_base
from conftest import ROOT, SMALL, write_hf_checkpoint

IDS = torch.tensor([[464, 2068, 7586, 21831, 18045]])


def reference_logits(folder):
    return load_base(str(folder), device="cpu")(IDS)


def test_safetensors_file_bin_file_and_seed_style_pt_all_load_the_same(hf_small, tmp_path):
    ref = reference_logits(hf_small)
    state = load_file(str(hf_small / "model.safetensors"))
    # pytorch_model.bin beside config.json
    binf = tmp_path / "bin"
    binf.mkdir()
    shutil.copy(hf_small / "config.json", binf)
    torch.save(state, binf / "pytorch_model.bin")
    assert torch.allclose(reference_logits(binf), ref)
    # a seed-style gpt2_weights.pt: HF keys with the mask buffers still in, nested under "model"
    pt = tmp_path / "pt"
    pt.mkdir()
    shutil.copy(hf_small / "config.json", pt)
    nested = dict(state)
    nested["transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    torch.save({"model": nested}, pt / "gpt2_weights.pt")
    assert torch.allclose(reference_logits(pt), ref)
    # a nanoGPT-style export: the four projections in nn.Linear orientation (out, in)
    lin = tmp_path / "linear"
    lin.mkdir()
    shutil.copy(hf_small / "config.json", lin)
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    torch.save({k: (v.t().contiguous() if k.endswith(conv) else v) for k, v in state.items()}, lin / "gpt2_weights.pt")
    assert torch.allclose(reference_logits(lin), ref)


def test_pickled_code_in_a_pt_file_is_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"transformer.wte.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="could not be read"):
        load_base(str(tmp_path / "evil.pt"), device="cpu")
    assert not marker.exists()


def test_wrong_shape_names_the_key(hf_small):
    state = load_file(str(hf_small / "model.safetensors"))
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 200)
    save_file(state, str(hf_small / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight.*shape"):
        load_base(str(hf_small), device="cpu")


def test_missing_key_names_the_key(hf_small):
    state = load_file(str(hf_small / "model.safetensors"))
    del state["transformer.h.1.ln_2.bias"]
    save_file(state, str(hf_small / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing 1 key.*transformer\.h\.1\.ln_2\.bias"):
        load_base(str(hf_small), device="cpu")


def test_unknown_width_without_config_asks_for_config_json(hf_small):
    (hf_small / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json"):
        load_base(str(hf_small), device="cpu")


def test_folder_without_weights_and_unknown_names_are_explained(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match="no weights in"):
        load_base(str(tmp_path / "junk"), device="cpu")
    with pytest.raises(WeightsError, match="unknown model 'gpt5'"):
        load_base("gpt5", device="cpu")


def _run_offline(code, env_extra):
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_unreachable_hub_gives_an_actionable_message(tmp_path):
    code = ("from core.model.weights import load_base, WeightsError\n"
            "try:\n    load_base('gpt2', device='cpu')\nexcept WeightsError as e:\n    print('MSG', e)\n")
    r = _run_offline(code, {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9",
                            "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert "MSG could not get config.json of openai-community/gpt2" in r.stdout, r.stdout + r.stderr
    assert "--weights" in r.stdout and "tiny" in r.stdout


def test_offline_mode_with_a_filled_cache_loads_from_the_cache(tmp_path):
    src = write_hf_checkpoint(tmp_path / "src", SMALL)
    snap = tmp_path / "hf" / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, snap / f)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    code = ("from core.model.weights import load_base\n"
            "m = load_base('gpt2', device='cpu')\nprint('LAYERS', m.config.n_layer, m.config.n_embd)\n")
    r = _run_offline(code, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert "LAYERS 2 64" in r.stdout, r.stdout + r.stderr


def test_save_hf_publishes_a_whole_new_folder_and_never_writes_over_one(tmp_path):
    from core.model.weights import hf_state_dict, save_hf
    model = load_base("tiny", device="cpu")
    out = save_hf(model, tmp_path / "base")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = hf_state_dict(load_base(str(out), device="cpu"))
    assert all(torch.equal(v, again[k]) for k, v in hf_state_dict(model).items())
    written = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        save_hf(model.to(torch.bfloat16), out, dtype=torch.bfloat16)
    assert (out / "model.safetensors").read_bytes() == written  # the folder there is left as it was
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # and no half-built folder beside it


def test_local_weights_of_another_size_than_the_chosen_preset_are_refused_in_one_sentence():
    from core.model.config import PRESETS
    from core.model.weights import WeightsError, check_preset_shape
    check_preset_shape(PRESETS["gpt2"], "gpt2", "/somewhere/gpt2.safetensors", "x")  # its own shape passes
    with pytest.raises(WeightsError) as e:
        check_preset_shape(PRESETS["tiny"], "gpt2", "/somewhere/model.safetensors", "start with the matching --model")
    assert str(e.value) == ("--weights model.safetensors holds a 2-layer width-64 GPT-2, not gpt2 (12 layers, width "
                            "768); start with the matching --model.")
