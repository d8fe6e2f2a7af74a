"""GGUF export (python -m core merge --gguf, the Library's GGUF button): the file, read back with
gguf.GGUFReader, holds every tensor llama.cpp's GPT-2 loader asks for, equal to the merged weights within
the type's rounding, every key llama.cpp requires for GPT-2, and GPT-2's tokenizer. Names and keys come
from the gguf package's own constants, never typed here.

The GGUF adapter (merge --gguf-adapter, the Library's GGUF adapter button): the adapter alone, which
llama.cpp's --lora applies as W x + alpha / r * B (A x) per tensor (src/llama-adapter.cpp, build_lora_mm):
that sum, computed from the file, is our merged weight."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from adapter_helpers import make_adapter
from cli_helpers import one_line_error
from core.__main__ import main
from core.adapters.format import save_adapter
from core.adapters.gguf_export import export_gguf, export_gguf_adapter
from core.adapters.validate import AdapterError
from core.lora.layers import lora_layers
from core.model import tokenizer
from core.lora.config import LoraConfig
from core.model.config import EOT_TOKEN
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
    """tiny with adapter 'a' on all four projections (A and B random), and its merged weights summed here
    (hand_merged), a path separate from the export's."""
    model = load_base("tiny", device="cpu")
    make_adapter(model, "a", LC, seed=3, std=0.2)
    before = hf_state_dict(model)
    state = hand_merged(model, "a")
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


# ---- the adapter alone, for llama.cpp's --lora --------------------------------------------------------

def read_adapter(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(the keys llama.cpp reads from an adapter file, {tensor name: numpy (rows, columns)})."""
    reader = gguf.GGUFReader(path)
    K = gguf.Keys
    keys = {k: _value(reader, k) for k in (K.General.TYPE, K.General.ARCHITECTURE, K.Adapter.TYPE,
                                           K.Adapter.LORA_ALPHA) if k in reader.fields}
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
    return keys, {t.name: _read(t) for t in reader.tensors}


def applied_as_llama_cpp_does(base: dict[str, np.ndarray], keys: dict, pairs: dict[str, np.ndarray]) -> dict:
    """llama.cpp's --lora on base weights (GGUF names, (out, in)): for each `<W>.lora_a` / `<W>.lora_b`
    pair, W + alpha / r * (B @ A), r = lora_b's rank (ggml's ne[0], numpy's last dim); its load-time shape
    checks too (A is (r, in), B is (out, r))."""
    out = dict(base)
    alpha = keys[gguf.Keys.Adapter.LORA_ALPHA]
    for name in {n.rsplit(".", 1)[0] for n in pairs}:
        a, b = pairs[f"{name}.lora_a"], pairs[f"{name}.lora_b"]
        w = base[name]
        assert a.shape == (b.shape[1], w.shape[1]) and b.shape[0] == w.shape[0], name
        out[name] = w + np.float32(alpha / b.shape[1]) * (b.astype(np.float64) @ a).astype(np.float32)
    return out


def hand_merged(model, name: str) -> dict[str, torch.Tensor]:
    """The HF-layout fp32 weights with adapter `name` added: W + s B A per wrapped projection, in float64."""
    state = {k: v.clone().float() for k, v in hf_state_dict(model).items()}
    for path, layer in lora_layers(model).items():
        if layer.has(name):
            A, B = (t.detach().double() for t in layer.weights(name))
            state[f"{path}.weight"] = (state[f"{path}.weight"].double() + (B @ A).t() * layer.scaling[name]).float()
    return state


def merged_in_gguf_layout(model, name: str) -> tuple[dict, dict]:
    """(base, base + adapter `name`) as GGUF name -> (out, in) weights, merged by hand_merged."""
    n = model.config.n_layer
    base = expected_tensors({k: v.float() for k, v in hf_state_dict(model).items()}, n)
    return base, expected_tensors(hand_merged(model, name), n)


def assert_same_as_merged(model, name: str, path) -> dict:
    keys, pairs = read_adapter(path)
    base, merged = merged_in_gguf_layout(model, name)
    got = applied_as_llama_cpp_does(base, keys, pairs)
    changed = 0
    for k, want in merged.items():
        assert np.allclose(got[k], want, rtol=0, atol=1e-5), k
        changed += not np.array_equal(base[k], want)
    assert changed == len(pairs) // 2  # every pair's tensor, and none else, is changed
    return keys


def test_the_adapter_file_is_what_llama_cpp_loads_and_adds_up_to_the_merge(merged, files, tmp_path):
    model, _ = merged
    path = export_gguf_adapter(model, "a", tmp_path / "a-lora.gguf")
    keys = assert_same_as_merged(model, "a", path)
    assert keys == {gguf.Keys.General.TYPE: "adapter", gguf.Keys.General.ARCHITECTURE: ARCH,
                    gguf.Keys.Adapter.TYPE: "lora", gguf.Keys.Adapter.LORA_ALPHA: LC.alpha}
    _, pairs = read_adapter(path)
    n = model.config.n_layer
    targets = [gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for i in range(n) for t in CONV1D]
    assert set(pairs) == {f"{t}.{ab}" for t in targets for ab in ("lora_a", "lora_b")}
    # the names are those of our merged GGUF's tensors (llama.cpp finds the base tensor by that name)
    assert set(targets) <= {t.name for t in files["f16"].tensors}
    w = model.transformer.h[0].attn.c_attn  # the fused q,k,v: B's 3 * n_embd rows are attn_qkv's rows
    assert pairs["blk.0.attn_qkv.weight.lora_b"].shape == (3 * model.config.n_embd, LC.r)
    assert np.array_equal(pairs["blk.0.attn_qkv.weight.lora_b"], w.weights("a")[1].detach().numpy())
    assert np.array_equal(pairs["blk.0.attn_qkv.weight.lora_a"], w.weights("a")[0].detach().numpy())
    with pytest.raises(AdapterError, match="already exists"):
        export_gguf_adapter(model, "a", path)


def test_rslora_and_per_layer_ranks_and_alphas_come_out_exact(tmp_path):
    """llama.cpp keeps one alpha and scales each tensor by alpha / its own rank: rsLoRA's alpha / sqrt(r) is
    written as alpha * sqrt(r); a layer whose rank or alpha pattern gives another scale has it in its B."""
    model = load_base("tiny", device="cpu")
    rs = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_proj"), use_rslora=True)
    make_adapter(model, "rs", rs, seed=5, std=0.2)
    mixed = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc"), use_rslora=True,
                       rank_pattern={"h.1.attn.c_attn": 2, "h.0.mlp.c_fc": 8}, alpha_pattern={"h.0.attn.c_proj": 3.0})
    make_adapter(model, "mixed", mixed, seed=6, std=0.2)
    keys = assert_same_as_merged(model, "rs", export_gguf_adapter(model, "rs", tmp_path / "rs.gguf"))
    assert keys[gguf.Keys.Adapter.LORA_ALPHA] == pytest.approx(8.0 * 2)  # alpha * sqrt(4)
    path = export_gguf_adapter(model, "mixed", tmp_path / "mixed.gguf")
    keys = assert_same_as_merged(model, "mixed", path)
    assert keys[gguf.Keys.Adapter.LORA_ALPHA] == pytest.approx(8.0 * 2)  # what most layers need
    _, pairs = read_adapter(path)
    assert pairs["blk.1.attn_qkv.weight.lora_a"].shape == (2, model.config.n_embd)
    assert pairs["blk.0.ffn_up.weight.lora_b"].shape == (4 * model.config.n_embd, 8)


def test_dora_is_refused_in_one_sentence_and_nothing_is_written(tmp_path, capsys):
    model = load_base("tiny", device="cpu")
    dora = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",), use_dora=True)
    make_adapter(model, "d", dora, seed=7)
    with pytest.raises(AdapterError, match="DoRA adapter, which llama.cpp's --lora cannot apply"):
        export_gguf_adapter(model, "d", tmp_path / "d.gguf")
    folder = save_adapter(model, "d", tmp_path / "d", dora, "tiny")
    err = one_line_error(capsys, ["merge", "--lora", folder, "--gguf-adapter", tmp_path / "d-lora.gguf",
                                  "--gguf", tmp_path / "d.gguf"])
    assert "DoRA" in err and "export it merged" in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_the_cli_and_the_library_tab_write_the_adapter_file(merged, studio, tmp_path, capsys):
    from studio.tabs import library
    model, _ = merged
    folder = save_adapter(model, "a", tmp_path / "mine", LC, "tiny")
    out = tmp_path / "mine-lora.gguf"
    assert main(["merge", "--lora", str(folder), "--gguf-adapter", str(out)]) == 0
    said = capsys.readouterr().out
    assert "GGUF adapter" in said and "--lora" in said and "merged" not in said  # nothing was merged
    assert_same_as_merged(model, "a", out)
    assert "already exists" in one_line_error(capsys, ["merge", "--lora", folder, "--gguf-adapter", out])
    save_adapter(model, "a", studio.library.root / "pirate", LC, "tiny")
    msg, path = library.gguf_adapter_export(studio, "pirate")
    assert "GGUF adapter" in msg and "--lora" in msg and path.endswith("pirate-lora.gguf")
    assert_same_as_merged(model, "a", path)
