"""GGUF export (python -m core merge --gguf, the Library's GGUF button): the file, read back with
gguf.GGUFReader, holds every tensor llama.cpp's GPT-2 loader asks for, equal to the merged weights within
the type's rounding, every key llama.cpp requires for GPT-2, and GPT-2's tokenizer. Names and keys come
from the gguf package's own constants, never typed here."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from adapter_helpers import make_adapter
from cli_helpers import one_line_error
from core.__main__ import main
from core.adapters.format import save_adapter
from core.adapters.gguf_export import export_gguf
from core.adapters.validate import AdapterError
from core.lora.layers import merge, unmerge
from core.model import tokenizer
from core.model.config import EOT_TOKEN, LoraConfig
from core.model.weights import hf_state_dict, load_base

gguf = pytest.importorskip("gguf")
T = gguf.MODEL_TENSOR
ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2]
LC = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
# llama.cpp's GPT-2 tensors (src/llama-model.cpp, LLM_ARCH_GPT2) <- the HF weight each one is; Conv1D ones
# (stored (in, out) by HF) are transposed to nn.Linear's (out, in)
GLOBAL = {T.TOKEN_EMBD: "transformer.wte", T.POS_EMBD: "transformer.wpe", T.OUTPUT_NORM: "transformer.ln_f",
          T.OUTPUT: "transformer.wte"}  # output: GPT-2 ties it to the token embedding
BLOCK = {T.ATTN_NORM: "ln_1", T.ATTN_QKV: "attn.c_attn", T.ATTN_OUT: "attn.c_proj", T.FFN_NORM: "ln_2",
         T.FFN_UP: "mlp.c_fc", T.FFN_DOWN: "mlp.c_proj"}
CONV1D = {T.ATTN_QKV, T.ATTN_OUT, T.FFN_UP, T.FFN_DOWN}
NO_BIAS = {T.TOKEN_EMBD, T.POS_EMBD, T.OUTPUT}


def expected_tensors(state: dict, n_layer: int) -> dict[str, np.ndarray]:
    """GGUF name -> the weight it must hold, from HF-layout `state`."""
    out = {}
    items = [(gguf.TENSOR_NAMES[t], t, hf) for t, hf in GLOBAL.items()]
    items += [(gguf.TENSOR_NAMES[t].format(bid=i), t, f"transformer.h.{i}.{hf}") for i in range(n_layer)
              for t, hf in BLOCK.items()]
    for name, t, hf in items:
        for part in ("weight",) if t in NO_BIAS else ("weight", "bias"):
            w = state[f"{hf}.{part}"]
            out[f"{name}.{part}"] = (w.t() if t in CONV1D and part == "weight" else w).numpy()
    return out


@pytest.fixture(scope="module")
def merged():
    """tiny with adapter 'a' on all four projections (A and B random), and its merged weights taken from the
    engine's in-place merge (core.lora.layers.merge), a path separate from the export's."""
    model = load_base("tiny", device="cpu")
    make_adapter(model, "a", LC, seed=3, std=0.2)
    before = hf_state_dict(model)
    merge(model, "a")
    state = {k: v.clone().float() for k, v in hf_state_dict(model).items()}
    unmerge(model)
    assert (state["transformer.h.0.attn.c_attn.weight"] - before["transformer.h.0.attn.c_attn.weight"]).abs().max() > 1e-2
    return model, state


@pytest.fixture(scope="module")
def files(merged, tmp_path_factory):
    model, _ = merged
    folder = tmp_path_factory.mktemp("gguf")
    return {q: gguf.GGUFReader(export_gguf(model, "a", folder / f"a-{q}.gguf", q)) for q in ("f16", "q8_0")}


def _read(t) -> np.ndarray:
    """A tensor's values as float32, in numpy's (rows, columns) order (ggml lists its dims the other way)."""
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(n) for n in reversed(t.shape)])


def test_every_tensor_equals_the_merged_weights_within_f16_rounding(files, merged):
    model, state = merged
    want = expected_tensors(state, model.config.n_layer)
    got = {t.name: t for t in files["f16"].tensors}
    assert set(got) == set(want)
    for name, t in got.items():
        is_f32 = t.data.ndim == 1 or name.startswith(gguf.TENSOR_NAMES[T.POS_EMBD])
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if is_f32 else gguf.GGMLQuantizationType.F16), name
        ref = want[name]
        tol = 0 if is_f32 else 2.0 ** -11 * np.abs(ref) + 2.0 ** -24  # half an f16 ulp (and its subnormals)
        assert np.all(np.abs(_read(t) - ref) <= tol), name


def test_q8_0_dequantizes_to_the_merged_weights_within_its_error(files, merged):
    model, state = merged
    want = expected_tensors(state, model.config.n_layer)
    for t in files["q8_0"].tensors:
        ref = want[t.name]
        if t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            assert ref.ndim == 1 or t.name.startswith(gguf.TENSOR_NAMES[T.POS_EMBD]), t.name
            continue
        blocks = ref.reshape(-1, 32)  # q8_0: blocks of 32 values, int8 times one f16 scale max|x| / 127
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(_read(t).reshape(-1, 32) - blocks)
        # half a step, plus up to 127 times the scale's f16 rounding (half an ulp, 2^-11 of it)
        assert np.all(err <= step * (0.5 + 127 * 2 ** -11) * (1 + 1e-6)), t.name


def _value(reader, key):
    return reader.fields[key].contents()


def test_every_key_llama_cpp_requires_for_gpt2_is_there(files, merged):
    cfg = merged[0].config
    K = gguf.Keys
    required = {  # llama_model::load_hparams + LLM_ARCH_GPT2 + the 'gpt2' tokenizer (src/llama-*.cpp)
        K.General.ARCHITECTURE: ARCH, K.LLM.CONTEXT_LENGTH.format(arch=ARCH): cfg.block_size,
        K.LLM.EMBEDDING_LENGTH.format(arch=ARCH): cfg.n_embd, K.LLM.BLOCK_COUNT.format(arch=ARCH): cfg.n_layer,
        K.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH): 4 * cfg.n_embd,
        K.Attention.HEAD_COUNT.format(arch=ARCH): cfg.n_head,
        K.Attention.LAYERNORM_EPS.format(arch=ARCH): pytest.approx(cfg.layer_norm_eps),
        K.Tokenizer.MODEL: "gpt2", K.Tokenizer.PRE: "gpt-2", K.Tokenizer.BOS_ID: EOT_TOKEN,
        K.Tokenizer.EOS_ID: EOT_TOKEN, K.Tokenizer.ADD_BOS: False,
        K.General.QUANTIZATION_VERSION: gguf.GGML_QUANT_VERSION,
    }
    for q, ftype in (("f16", gguf.LlamaFileType.MOSTLY_F16), ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0)):
        reader = files[q]
        for key, value in required.items():
            assert _value(reader, key) == value, (q, key)
        assert _value(reader, K.General.FILE_TYPE) == ftype
        for key in (K.Tokenizer.LIST, K.Tokenizer.TOKEN_TYPE, K.Tokenizer.MERGES):
            assert key in reader.fields


def test_the_tokenizer_is_gpt2s_rebuilt_from_the_bundled_ranks(files):
    reader = files["f16"]
    tokens = _value(reader, gguf.Keys.Tokenizer.LIST)
    types = _value(reader, gguf.Keys.Tokenizer.TOKEN_TYPE)
    merges = _value(reader, gguf.Keys.Tokenizer.MERGES)
    assert len(tokens) == len(types) == 50257 and len(merges) == 50000
    assert tokens[EOT_TOKEN] == "<|endoftext|>" and types[EOT_TOKEN] == gguf.TokenType.CONTROL
    assert set(types[:EOT_TOKEN]) == {gguf.TokenType.NORMAL}
    # byte-level text: ' ' is 'Ġ', '\n' is 'Ċ'; ids are the tiktoken ids
    for text, token in ((" the", "Ġthe"), ("\n", "Ċ"), ("Hello", "Hello"), (" pirate", "Ġpirate"), ("!", "!")):
        assert tokens[tokenizer.encode(text)[0]] == token, text
    assert tokens[:3] == ["!", '"', "#"] and tokens[256] == "Ġt"
    # GPT-2's merges.txt, first and last lines; merge i makes token 256 + i
    assert merges[:5] == ["Ġ t", "Ġ a", "h e", "i n", "r e"] and merges[-1] == "Ġg azed"
    assert all("".join(merges[i].split(" ")) == tokens[256 + i] for i in range(0, 50000, 997))


def test_the_cli_writes_gguf_and_refuses_what_it_cannot_do(merged, tmp_path, capsys, monkeypatch):
    model, state = merged
    folder = save_adapter(model, "a", tmp_path / "mine", LC, "tiny")
    out = tmp_path / "mine-q8.gguf"
    assert main(["merge", "--lora", str(folder), "--gguf", str(out), "--type", "q8_0"]) == 0
    assert "GGUF, q8_0" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    qkv = next(t for t in reader.tensors if t.name == gguf.TENSOR_NAMES[T.ATTN_QKV].format(bid=1) + ".weight")
    ref = state["transformer.h.1.attn.c_attn.weight"].t().numpy()
    assert qkv.tensor_type == gguf.GGMLQuantizationType.Q8_0 and np.abs(_read(qkv) - ref).max() < 0.01 * np.abs(ref).max()
    # an existing file is never overwritten; --output or --gguf is needed; a missing package says what to install
    assert "already exists" in one_line_error(capsys, ["merge", "--lora", folder, "--gguf", out])
    assert "--gguf FILE" in one_line_error(capsys, ["merge", "--lora", folder])
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert "pip install gguf" in one_line_error(capsys, ["merge", "--lora", folder, "--gguf", tmp_path / "x.gguf"])
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*.tmp"))


def test_the_library_tab_exports_gguf_of_a_library_adapter(studio, merged):
    from studio.tabs import library
    model, _ = merged
    save_adapter(model, "a", studio.library.root / "pirate", LC, "tiny")
    msg, path = library.gguf_export(studio, "pirate", "f16")
    assert "GGUF" in msg and "f16" in msg and path.endswith("pirate-f16.gguf")
    assert {t.name for t in gguf.GGUFReader(path).tensors} >= {gguf.TENSOR_NAMES[T.OUTPUT] + ".weight"}
    with pytest.raises(ValueError, match="choose the GGUF type"):
        library.gguf_export(studio, "pirate", "../../q4")
    with pytest.raises(AdapterError, match="GPT-2 vocabulary"):  # a base with another vocabulary has no GGUF tokenizer
        from dataclasses import replace
        m = load_base("tiny", device="cpu")
        make_adapter(m, "b", LC)
        m.config = replace(m.config, vocab_size=50304)
        export_gguf(m, "b", studio.library.root.parent / "b.gguf")
