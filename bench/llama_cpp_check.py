"""Runs exported GGUF files in real llama.cpp (through llama-cpp-python) and compares them with this engine:
issue 17's "run the exported file once in llama.cpp" check, and issue 30's for the GGUF adapter (--lora). Not a test: llama-cpp-python compiles
llama.cpp from source (10 minutes or more on 2 cores), so it is installed by hand, never by CI, and named in
no requirements file:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" \
        pip install --no-binary llama-cpp-python llama-cpp-python
    python bench/llama_cpp_check.py [--json out.json]

What it does, all on CPU:
- a random GPT-2 written by transformers (GPT-2's 50,257-token vocabulary, so the GGUF tokenizer is the
  real one; widths multiples of 32, so q8_0 blocks every weight), and an adapter on all four projections
  with random A and B (B non-zero, so it changes the output; checked);
- the adapter saved as a library folder and exported by the product's own CLI,
  `python -m core merge --lora DIR --gguf FILE --type f16|q8_0`;
- llama.cpp loads each file; its logits for a prompt are compared with this engine's (base + adapter,
  float32, not merged), and the two greedy continuations (argmax both) token by token;
- the adapter alone, `merge --gguf-adapter FILE`, loaded by llama.cpp over a base GGUF (f16 and q8_0)
  as `--lora` does (Llama(model_path=base, lora_path=adapter)); the base GGUF is written by the same CLI
  from an adapter whose B is zero (base + 0 is the base). Two adapters: the one above (adapter.lora.alpha
  is its alpha), and one with rsLoRA and per-layer ranks and alphas (the written alpha is alpha * sqrt(r),
  and the layers with another scale carry it in their B); each compared as above, and llama.cpp's own
  logits with and without the adapter must differ (it was applied);
- llama.cpp's tokenizer, built from the file's vocabulary and merges, against tiktoken on a few strings.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_hf_checkpoint, table  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.__main__ import main as cli  # noqa: E402
from core.adapters.format import save_adapter  # noqa: E402
from core.lora.layers import add_adapter, lora_parameters  # noqa: E402
from core.model import tokenizer  # noqa: E402
from core.lora.config import LoraConfig
from core.model.weights import load_base  # noqa: E402

LC = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
PROMPT = "The pirate ship sailed into the harbour, and the captain said"
STRINGS = [  # pre-tokenizer corners: contractions, runs of spaces, newlines, digits, accents, CJK, emoji
    "Hello world", " the pirate's ship!!", "I'm sure they'll say we've done it, don't you?",
    "  two  spaces\n\nand a\ttab   ", "numbers 12345 and 3.14159, 2026-11-30", "café naïve résumé",
    "日本語のテキスト", "emoji 🙂👍🏽 done", "<|endoftext|>", "a<|endoftext|>b",
    "def f(x):\n    return x ** 2  # square\n",
]
# rsLoRA with ranks and alphas that differ per layer: the GGUF adapter's hardest case short of DoRA (refused)
LV = LoraConfig(r=8, alpha=8.0, targets=LC.targets, use_rslora=True,
                rank_pattern={"h.1.attn.c_attn": 2, "h.0.mlp.c_fc": 16}, alpha_pattern={"h.2.mlp.c_proj": 3.0})
TOLERANCE = {"f16": 1e-2, "q8_0": 5e-2}  # max |llama.cpp - ours| as a fraction of max |logit|


def make_model(folder: Path, n_layer: int, n_head: int, n_embd: int):
    """A random HF GPT-2 with a random adapter 'a' (A and B both random), loaded in float32 on CPU."""
    weights = random_hf_checkpoint(n_layer, n_head, n_embd, seed=0, folder=folder / "base")
    model = load_base(str(weights), device="cpu", dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        before = model(ids).float()
        add_random(model, "a", LC, seed=1)
        after = model(ids, "a").float()
    change = (after - before).abs().max().item()
    assert change > 1e-2, f"the adapter barely changes the logits ({change:.2e}); the check would prove nothing"
    return model, weights, change


@torch.no_grad()
def add_random(model, name: str, lcfg: LoraConfig, seed: int) -> None:
    add_adapter(model, name, lcfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for p in lora_parameters(model, name):
        p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@torch.no_grad()
def our_logits(model, ids: list[int], adapter: str) -> np.ndarray:
    return model(torch.tensor([ids]), adapter).float()[0].numpy()


@torch.no_grad()
def our_greedy(model, ids: list[int], n: int, adapter: str) -> tuple[list[int], float]:
    """n argmax tokens, and the smallest gap between the best and second-best logit on the way (how close a
    step came to a tie that rounding could flip)."""
    ids, gap = list(ids), float("inf")
    for _ in range(n):
        last = model(torch.tensor([ids]), adapter).float()[0, -1]
        top = last.topk(2).values
        gap = min(gap, float(top[0] - top[1]))
        ids.append(int(last.argmax()))
    return ids[-n:], gap


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def compare(llm, model, label: str, tol: float, n_new: int, adapter: str = "a") -> dict:
    ids = tokenizer.encode(PROMPT)
    ours, theirs = our_logits(model, ids, adapter), llama_logits(llm, ids)
    diff = np.abs(ours - theirs)
    scale = float(np.abs(ours).max())
    top2 = np.sort(ours, axis=-1)[:, -2:]
    (g_ours, gap), g_theirs = our_greedy(model, ids, n_new, adapter), llama_greedy(llm, ids, n_new)
    first = next((i for i, (a, b) in enumerate(zip(g_ours, g_theirs)) if a != b), None)
    return {
        "type": label, "prompt_tokens": len(ids), "logit_scale": scale,
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "max_rel_diff": float(diff.max()) / scale, "tolerance_rel": tol,
        "within_tolerance": float(diff.max()) / scale <= tol,
        "argmax_agree": int((ours.argmax(-1) == theirs.argmax(-1)).sum()),
        "smallest_top1_top2_gap": float((top2[:, 1] - top2[:, 0]).min()),
        "greedy_tokens": n_new, "greedy_smallest_top1_top2_gap": gap, "greedy_same": g_ours == g_theirs,
        "first_difference": first,
        "greedy_ours": tokenizer.decode(g_ours), "greedy_llama_cpp": tokenizer.decode(g_theirs),
    }


def compare_adapters(model, weights, folder: Path, tmp: Path, n_new: int) -> list[dict]:
    """The GGUF adapters of 'a' (folder) and of a variant adapter, each over the f16 and the q8_0 base GGUF."""
    import llama_cpp
    add_adapter(model, "zero", LC, seed=3)  # B starts at zero: merged, it is the base
    add_random(model, "v", LV, seed=4)
    folders = {"zero": save_adapter(model, "zero", tmp / "zero", LC, str(weights)), "a": folder,
               "v": save_adapter(model, "v", tmp / "v", LV, str(weights))}
    files = {}
    for name in ("a", "v"):
        files[name] = tmp / f"{name}-lora.gguf"
        assert cli(["merge", "--lora", str(folders[name]), "--weights", str(weights),
                    "--gguf-adapter", str(files[name])]) == 0
    ids, rows = tokenizer.encode(PROMPT), []
    for qtype in ("f16", "q8_0"):
        base = tmp / f"base-{qtype}.gguf"
        assert cli(["merge", "--lora", str(folders["zero"]), "--weights", str(weights), "--gguf", str(base),
                    "--type", qtype]) == 0
        llm = llama_cpp.Llama(model_path=str(base), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
        plain = llama_logits(llm, ids)
        llm.close()
        for name, path in files.items():
            llm = llama_cpp.Llama(model_path=str(base), lora_path=str(path), logits_all=True, n_ctx=256,
                                  n_threads=2, verbose=False)
            r = compare(llm, model, f"{qtype} base + GGUF adapter {name}", TOLERANCE[qtype], n_new, name)
            r.update(file_mb=round(path.stat().st_size / 2**20, 2),
                     llama_cpp_adapter_change=float(np.abs(llama_logits(llm, ids) - plain).max()))
            rows.append(r)
            llm.close()
    return rows


def compare_tokenizers(llm) -> list[dict]:
    rows = []
    for text in STRINGS:
        ours = tokenizer.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        back = llm.detokenize(ours, special=True).decode("utf-8", errors="replace")
        rows.append({"text": text, "ours": ours, "llama_cpp": list(theirs), "same": ours == list(theirs),
                     "detokenize_same": back == text})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=128, help="n_embd; a multiple of 32 so q8_0 blocks every row")
    p.add_argument("--tokens", type=int, default=20, help="greedy tokens to compare")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    import llama_cpp
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-check-") as tmp:
        tmp = Path(tmp)
        model, weights, change = make_model(tmp, args.layers, args.heads, args.width)
        folder = save_adapter(model, "a", tmp / "mine", LC, str(weights))
        results, tok_rows = [], None
        for qtype in ("f16", "q8_0"):
            out = tmp / f"mine-{qtype}.gguf"
            t0 = time.perf_counter()
            assert cli(["merge", "--lora", str(folder), "--weights", str(weights), "--gguf", str(out),
                        "--type", qtype]) == 0
            export_s = time.perf_counter() - t0
            llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
            r = compare(llm, model, qtype, TOLERANCE[qtype], args.tokens)
            r.update(file_mb=round(out.stat().st_size / 2**20, 2), export_s=round(export_s, 2))
            results.append(r)
            if tok_rows is None:
                tok_rows = compare_tokenizers(llm)
            llm.close()
        adapter_rows = compare_adapters(model, weights, folder, tmp, args.tokens)
    results += adapter_rows
    print(f"llama-cpp-python {llama_cpp.__version__}; random GPT-2 {args.layers} layers, {args.heads} heads, "
          f"width {args.width}, vocab 50257; adapter r={LC.r} on {', '.join(LC.targets)} "
          f"(changes the logits by up to {change:.3f})")
    print(table([[r["type"], r["file_mb"], f"{r['logit_scale']:.3f}", f"{r['max_abs_diff']:.2e}",
                  f"{r['max_rel_diff']:.2e}", r["tolerance_rel"], f"{r['argmax_agree']}/{r['prompt_tokens']}",
                  f"{min(r['smallest_top1_top2_gap'], r['greedy_smallest_top1_top2_gap']):.2e}",
                  "yes" if r["greedy_same"] else f"no (from token {r['first_difference']})"] for r in results],
                ["type", "MB", "max |logit|", "max |diff|", "rel", "tol", "argmax agree", "closest top-2 gap",
                 f"greedy {args.tokens} same"]))
    for r in results:
        print(f"{r['type']}: ours {r['greedy_ours']!r}\n{' ' * len(r['type'])}  llama.cpp {r['greedy_llama_cpp']!r}")
    print(table([[repr(r["text"])[:40], len(r["ours"]), "yes" if r["same"] else f"NO {r['llama_cpp']}",
                  "yes" if r["detokenize_same"] else "NO"] for r in tok_rows],
                ["text", "tokens", "llama.cpp tokens same", "detokenize same"]))
    ok = all(r["within_tolerance"] for r in results) and all(r["same"] for r in tok_rows) \
        and all(r["greedy_same"] for r in results if r["type"].startswith("f16")) \
        and all(r["llama_cpp_adapter_change"] > 1e-2 for r in adapter_rows)
    if args.json:
        args.json.write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "date": time.strftime("%Y-%m-%d"),
                                         "config": vars(args) | {"json": str(args.json)}, "adapter_change": change,
                                         "adapter_variants": LV.to_dict(), "logits": results,
                                         "tokenizer": tok_rows, "ok": ok}, indent=1))
    print("OK: llama.cpp matches" if ok else "MISMATCH: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
