"""GGUF export for llama.cpp (and LM Studio, ollama and the like): base + adapter merged into one file in
llama.cpp's GPT-2 layout, written with the `gguf` package (optional: imported only here, on use).

What llama.cpp's convert_hf_to_gguf.py does for GPT-2, from the same merge as the HF export
(core.adapters.export.merged_state_dict):
- names from gguf's own GPT-2 map (transformer.h.0.attn.c_attn -> blk.0.attn_qkv, ...); the attention's
  fused q,k,v stays one tensor;
- the four Conv1D weights, stored (in, out) by HF, are transposed to (out, in) as nn.Linear keeps them;
- output.weight is a copy of token_embd.weight (GPT-2 ties them);
- biases, layer norms and position_embd stay F32; the other weights are F16, or Q8_0 with --type q8_0
  (a row whose length is no multiple of 32 falls back to F16, as llama.cpp's converter does);
- the tokenizer: model 'gpt2', pre-tokenizer 'gpt-2', the 50,257 byte-level tokens and 50,000 merges
  (core.model.bpe_vocab), <|endoftext|> as a control token and as BOS and EOS; no BOS is added to
  prompts (this engine adds none either).

export_gguf_adapter writes the adapter alone, as llama.cpp's convert_lora_to_gguf.py does, for `--lora`.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from core import atomic
from core.adapters.export import merged_state_dict
from core.adapters.validate import AdapterError
from core.lora.layers import adapter_names, lora_layers
from core.model.bpe_vocab import byte_level_vocab
from core.model.config import EOT_TOKEN
from core.model.weights import CONV1D  # HF Conv1D weights: (in, out)

GGUF_TYPES = ("f16", "q8_0")  # --type: the weights' storage (F16, or 8-bit blocks of 32 with a scale)


def load_gguf():
    """The gguf package, or a ValueError that says how to get it."""
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def export_gguf(model, adapter_name: str, out_path, qtype: str = "f16", title: str | None = None,
                base_state: dict | None = None) -> Path:
    """Write base + adapter `adapter_name` (loaded on `model`) as a new GGUF file `out_path`, whole or not at
    all. qtype: one of GGUF_TYPES. title: general.name (default: the adapter's name). base_state: the base's
    fp32 weights when `model` holds them in bf16 (core.adapters.export.merged_state_dict)."""
    gguf = load_gguf()
    if qtype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {str(qtype)[:20]!r}; choose {' or '.join(GGUF_TYPES)}.")
    out = Path(out_path)
    if out.exists() or out.is_symlink():
        raise AdapterError(f"{out} already exists; choose a new file name for the GGUF model.")
    cfg = model.config
    tokens, merges = byte_level_vocab()
    if cfg.vocab_size != len(tokens):
        raise AdapterError(f"this base has {cfg.vocab_size} token embeddings, not GPT-2's {len(tokens)}; "
                           f"GGUF export needs the GPT-2 vocabulary.")
    tensors = _tensors(gguf, merged_state_dict(model, adapter_name, base_state), cfg.n_layer, qtype)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2]

    def write(tmp: Path):
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(title or adapter_name)
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(list(tokens))
        w.add_token_types([gguf.TokenType.CONTROL if i == EOT_TOKEN else gguf.TokenType.NORMAL
                           for i in range(len(tokens))])
        w.add_token_merges(list(merges))
        w.add_bos_token_id(EOT_TOKEN)
        w.add_eos_token_id(EOT_TOKEN)
        w.add_add_bos_token(False)
        for name, data, raw_dtype in tensors:
            w.add_tensor(name, data, raw_dtype=raw_dtype)
        return w

    return _publish(out, write, "GGUF model")


def _tensors(gguf, state: dict, n_layer: int, qtype: str) -> list[tuple]:
    """(GGUF name, numpy data, its GGML type) for every tensor, in llama.cpp's GPT-2 layout."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, n_layer)
    F32, Q = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType
    wanted = Q.F16 if qtype == "f16" else Q.Q8_0
    pos_embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight"
    token_embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    out = []
    for hf_name, t in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AdapterError(f"{hf_name} has no place in llama.cpp's GPT-2 layout; cannot export it to GGUF.")
        data = (t.t() if hf_name.endswith(CONV1D) else t).contiguous().numpy()
        pairs = [(name, data)] + ([(output, data)] if name == token_embd else [])  # GPT-2's tied output
        for n, d in pairs:
            kind = F32 if d.ndim <= 1 or n.endswith("_norm.weight") or n == pos_embd or not n.endswith(".weight") \
                else wanted
            try:
                q = gguf.quants.quantize(d, kind)
            except gguf.QuantError:  # a row length q8_0 cannot block: F16, as llama.cpp's converter does
                kind, q = Q.F16, gguf.quants.quantize(d, Q.F16)
            out.append((n, q, kind))
    return out


def export_gguf_adapter(model, adapter_name: str, out_path, title: str | None = None) -> Path:
    """Write adapter `adapter_name` (loaded on `model`) alone as a GGUF adapter file `out_path` for
    llama.cpp's --lora, to load over a GGUF of the same base (export_gguf's names); whole or not at all.

    llama.cpp (src/llama-adapter.cpp, llm_graph_context::build_lora_mm) adds scale * B (A x) to W x for
    each tensor W that has a pair `<W's name>.lora_a` (ggml [in, r], numpy (r, in)) and `.lora_b` (ggml
    [r, out], numpy (out, r)), scale = adapter.lora.alpha / r, r being that lora_b's own rank. Our A (r, in)
    and B (out, r) are in that orientation already, Conv1D or not, and c_attn's B is the fused q,k,v rows
    of attn_qkv. The file holds one alpha: the one most layers need (alpha * sqrt(r) for rsLoRA); a layer
    whose scale differs (per-layer ranks or alphas) has the ratio folded into its B. F32: exact, and small."""
    gguf = load_gguf()
    out = Path(out_path)
    if out.exists() or out.is_symlink():
        raise AdapterError(f"{out} already exists; choose a new file name for the GGUF adapter.")
    alpha, pairs = _adapter_pairs(gguf, model, adapter_name)
    F32 = gguf.GGMLQuantizationType.F32

    def write(tmp: Path):
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(title or adapter_name)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, data in pairs:
            w.add_tensor(name, data, raw_dtype=F32)
        return w

    return _publish(out, write, "GGUF adapter")


def _publish(out: Path, fill, what: str) -> Path:
    """Write the GGUFWriter that `fill(tmp)` returns (its keys and tensors added) as new file `out`, whole or not
    at all (core.atomic.publish_file: never over an existing file)."""
    def write(tmp: Path):
        w = fill(tmp)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic.publish_file(out, write)
    except FileExistsError:
        raise AdapterError(f"{out.name} already exists; choose a new file name for the {what}.") from None


def _adapter_pairs(gguf, model, adapter_name: str) -> tuple[float, list[tuple]]:
    """(adapter.lora.alpha, [(GGUF name, float32 numpy)]): each wrapped projection's lora_a and lora_b."""
    if adapter_name not in adapter_names(model):
        raise AdapterError(f"no adapter named {adapter_name!r} is loaded.")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    layers = {path: layer for path, layer in lora_layers(model).items() if layer.has(adapter_name)}
    odd = next((layer.variant[adapter_name] for layer in layers.values()
                if not layer.variant[adapter_name].low_rank), None)
    if odd is not None:  # llama.cpp adds s B A x, nothing else (DoRA's magnitude has no place there)
        raise AdapterError(f"{adapter_name!r} is a {odd.label} adapter, which llama.cpp's --lora cannot apply; "
                           f"export it merged into the base as GGUF instead.")
    # the alpha llama.cpp needs for each layer's own scale (alpha / r, or alpha / sqrt(r) with rsLoRA)
    need = {path: layer.scaling[adapter_name] * layer.weights(adapter_name)[0].shape[0]
            for path, layer in layers.items()}
    alpha = Counter(float(a) for a in need.values()).most_common(1)[0][0]
    pairs = []
    for path, layer in layers.items():
        A, B = (t.detach().to("cpu", torch.float32) for t in layer.weights(adapter_name))
        if not math.isclose(need[path], alpha, rel_tol=1e-12):
            B = B * (need[path] / alpha)
        if not bool(A.isfinite().all() and B.isfinite().all()):
            raise AdapterError(f"{adapter_name!r} has non-finite weights in {path}; refusing to export.")
        name = names.get_name(path + ".weight", try_suffixes=(".weight",))  # blk.N.attn_qkv.weight
        pairs += [(f"{name}.lora_a", A.contiguous().numpy()), (f"{name}.lora_b", B.contiguous().numpy())]
    return alpha, pairs
