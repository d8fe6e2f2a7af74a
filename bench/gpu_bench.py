"""The performance issue's figures, ours against transformers+PEFT, in one run (CUDA; --quick on CPU).

    python bench/gpu_bench.py --out result.json [--quick] [--only checks,decode,scheduler,eval_compare,...]
                              [--model gpt2|tiny] [--sched-requests 64] [--sched-tokens 128]

Issue 28's sections, all through the one decode engine (core.generate: scheduler, KV slots, a runner that
replays a CUDA graph per batch bucket): `checks` (captured steps equal eager ones), `decode` (batch-1 decode,
goal >= 1,500 tok/s on an H200), `scheduler` (64 concurrent requests vs one alone: >= 20x its tok/s, p95
per-token latency <= 2x), `eval_compare` (a compare's latency idle and during another user's evaluation of 9
models at context 1024 over 32K tokens). Without a GPU, `scheduler` runs a small CPU smoke check (8 x 16
tokens); the goals it cannot measure are printed as "not measured":
    python bench/gpu_bench.py --quick --model tiny --only checks,decode,scheduler,eval_compare --out /tmp/s.json

Each section records its figures or its error in the JSON; a failing section never hides the others.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.lora import layers as lora  # noqa: E402
from core.lora.config import LoraConfig
from core.model.config import GPTConfig, PRESETS
from core.train.config import TrainConfig
from core.train.estimate import estimate_training, flops_per_token  # noqa: E402
from core.generate.sampling import SamplingConfig, generate  # noqa: E402
from core.model.gpt import GPT  # noqa: E402
from core.model.quant import quantize_base  # noqa: E402
from core.model.weights import build, normalize_keys  # noqa: E402

GiB = 1024 ** 3
PEAK_BF16 = 790e12  # the design guide's measured dense bf16 rate of this H200


def dev_sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(dev):
    return torch.cuda.max_memory_allocated() / GiB if dev.type == "cuda" else float("nan")


def hf_config(cfg: GPTConfig):
    import transformers
    return transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                   vocab_size=cfg.vocab_size, n_positions=cfg.block_size,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def peer_model(cfg: GPTConfig, dev, dtype, seed=0):
    import transformers
    torch.manual_seed(seed)
    with torch.device(dev):
        m = transformers.GPT2LMHeadModel(hf_config(cfg))
    return m.to(dtype).eval()


def ours_from(peer, cfg, dev, dtype):
    """Our model with the peer's exact weights."""
    m = build(cfg, normalize_keys({k: v.detach().float().cpu() for k, v in peer.state_dict().items()}))
    for p in m.parameters():
        p.requires_grad_(False)
    return m.to(dev, dtype).eval()


def ours_random(cfg: GPTConfig, dev, dtype, seed=0):
    torch.manual_seed(seed)
    with torch.device(dev):
        m = GPT(cfg)
        for n, p in m.named_parameters():
            torch.nn.init.normal_(p, 0, 0.02) if p.dim() > 1 else (torch.nn.init.ones_(p) if "ln" in n and n.endswith("weight") else torch.nn.init.zeros_(p))
    for p in m.parameters():
        p.requires_grad_(False)
    return m.to(dtype).eval()


def peft_wrap(peer, r=8, targets=("c_attn",)):
    import peft
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), fan_in_fan_out=True,
                          lora_dropout=0.0, task_type="CAUSAL_LM")
    return peft.get_peft_model(peer, cfg)


def batch(B, T, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50257, (B, T + 1), generator=g)
    return x[:, :-1].to(dev), x[:, 1:].to(dev)


def time_steps(step, dev, warmup=3, steps=10):
    for _ in range(warmup):
        step()
    dev_sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dev_sync(dev)
    return (time.perf_counter() - t) / steps


def _run(step, dev, compile_first, steps, base_alloc):
    t_compile = None
    if compile_first:
        t0 = time.perf_counter()
        step()
        step()
        dev_sync(dev)
        t_compile = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = time_steps(step, dev, steps=steps)
    out = {"step_ms": dt * 1e3, "peak_gib": (peak(dev) - base_alloc / GiB) if dev.type == "cuda" else float("nan")}
    if t_compile is not None:
        out["compile_s"] = t_compile
    return dt, out


def allocated(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated()
    return 0


def train_ours(make_model, B, T, dev, mode="eager", steps=10, chunk=256):
    """Tokens/s and peak GiB (weights included) of our LoRA training step, as the Trainer runs it:
    chunked fp32 cross entropy, backward, clip, fused AdamW.
    mode: eager | compile | compile-ro (torch.compile reduce-overhead) | graphed (CUDA graphs)."""
    base_alloc = allocated(dev)
    model = make_model()
    name = "bench"
    lora.add_adapter(model, name, LoraConfig(r=8, alpha=16, targets=("attn.c_attn",)))
    params = lora.lora_parameters(model, name)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda" or None)
    x, y = batch(B, T, dev)
    model.train()
    if mode == "eager":
        fn = lambda x, y: model.loss(x, y, name, chunk=chunk)
    elif mode in ("compile", "compile-ro"):
        fn = torch.compile(lambda x, y: model.loss(x, y, name, chunk=0),
                           mode="reduce-overhead" if mode == "compile-ro" else None)
    elif mode == "graphed":
        fn = graphed_loss(model, name, x, y, chunk)
    else:
        raise ValueError(mode)

    def step():
        loss = fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=mode == "eager")

    dt, out = _run(step, dev, mode != "eager", steps, base_alloc)
    out["tok_s"] = B * T / dt
    del opt, params, model, fn
    return out


def graphed_loss(model, name, x, y, chunk):
    """The loss's forward and backward captured as CUDA graphs (torch.cuda.make_graphed_callables)."""
    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, y):
            return self.model.loss(x, y, name, chunk=chunk)

    return torch.cuda.make_graphed_callables(Loss(), (x, y), num_warmup_iters=3)


def train_peer(make_model, B, T, dev, compile_=False, steps=10, autocast=False):
    base_alloc = allocated(dev)
    pm = peft_wrap(make_model())
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda" or None)
    x, y = batch(B, T, dev)
    pm.train()

    def loss_fn(x, y):
        return F.cross_entropy(pm(input_ids=x).logits.flatten(0, 1).float(), y.flatten())

    fn = torch.compile(loss_fn) if compile_ else loss_fn
    ctx = torch.autocast("cuda", torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)

    def step():
        with ctx:
            loss = fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt, out = _run(step, dev, compile_, steps, base_alloc)
    out["tok_s"] = B * T / dt
    del opt, params, pm, fn
    return out


def attempt(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded, the others still run
        return {"error": f"{type(e).__name__}: {e}"[:400]}


def mfu(cfg, T, tok_s):
    return tok_s * flops_per_token(cfg, T) / PEAK_BF16


# ---- sections ------------------------------------------------------------------------------

def sec_train(a, dev, R):
    cfg = a.cfg
    bf16 = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peer0 = peer_model(cfg, "cpu", torch.float32)
    state = {k: v.detach().clone() for k, v in peer0.state_dict().items()}
    del peer0

    def make_peer(dtype):
        def make():
            import transformers
            with torch.device(dev):
                m = transformers.GPT2LMHeadModel(hf_config(cfg))
            m.load_state_dict(state)
            return m.to(dtype)
        return make

    def make_ours():
        m = build(cfg, normalize_keys(state))
        for p in m.parameters():
            p.requires_grad_(False)
        return m.to(dev, bf16)

    B, T = a.small
    r = R["train_4x128"] = {}
    r["peer_fp32_autocast"] = attempt(lambda: train_peer(make_peer(torch.float32), B, T, dev, autocast=dev.type == "cuda"))
    r["peer_bf16"] = attempt(lambda: train_peer(make_peer(bf16), B, T, dev))
    r["ours_eager"] = attempt(lambda: train_ours(make_ours, B, T, dev))
    save(a, R)
    if not a.quick:
        r["ours_graphed"] = attempt(lambda: train_ours(make_ours, B, T, dev, mode="graphed"))
        save(a, R)
        r["ours_compile_ro"] = attempt(lambda: train_ours(make_ours, B, T, dev, mode="compile-ro"))
    peers = [v["tok_s"] for k, v in r.items() if k.startswith("peer") and "tok_s" in v]
    ours = {k: v for k, v in r.items() if k.startswith("ours") and "tok_s" in v}
    if peers and ours:
        best = max(ours, key=lambda k: ours[k]["tok_s"])
        r["best_ours"] = best
        r["speedup_vs_peer_eager"] = ours[best]["tok_s"] / max(peers)
        if "peak_gib" in r["peer_fp32_autocast"]:
            r["memory_ratio_vs_peer"] = min(v["peak_gib"] for v in ours.values()) / r["peer_fp32_autocast"]["peak_gib"]
    r["estimate_peak_gib"] = estimate_training(cfg, LoraConfig(), TrainConfig(batch_size=B, seq_len=T, grad_accum=1), dev.type).peak_bytes / GiB
    save(a, R)

    B, T = a.large
    big = R["train_16x1024"] = {}
    runs = [("ours_eager", lambda: train_ours(make_ours, B, T, dev, steps=a.steps)),
            ("peer_eager", lambda: train_peer(make_peer(bf16), B, T, dev, steps=a.steps))]
    if not a.quick:
        runs += [("ours_compiled", lambda: train_ours(make_ours, B, T, dev, mode="compile", steps=a.steps)),
                 ("peer_compiled", lambda: train_peer(make_peer(bf16), B, T, dev, compile_=True, steps=a.steps))]
    for label, fn in runs:
        big[label] = attempt(fn)
        if "tok_s" in big[label]:
            big[label]["mfu"] = mfu(cfg, T, big[label]["tok_s"])
        save(a, R)
    best = max((v["tok_s"] for k, v in big.items() if k.startswith("ours") and "tok_s" in v), default=None)
    peer_best = max((v["tok_s"] for k, v in big.items() if k.startswith("peer") and "tok_s" in v), default=None)
    if best and peer_best:
        big["speedup_vs_best_peer"] = best / peer_best
    big["estimate_peak_gib"] = estimate_training(cfg, LoraConfig(), TrainConfig(batch_size=B, seq_len=T, grad_accum=1), dev.type).peak_bytes / GiB


def sec_xl(a, dev, R):
    cfg = a.xl_cfg
    bf16 = torch.bfloat16 if dev.type == "cuda" else torch.float32
    B, T = a.small
    out = R["xl_4x128"] = {}
    tc = TrainConfig(batch_size=B, seq_len=T, grad_accum=1)

    def make(quant=None, ckpt=False):
        def f():
            m = ours_random(cfg, dev, bf16)
            if quant:
                quantize_base(m, quant)
            m.checkpointing = ckpt
            return m
        return f

    out["ours_bf16"] = attempt(lambda: train_ours(make(), B, T, dev, steps=5))
    out["estimate_peak_gib"] = estimate_training(cfg, LoraConfig(), tc, dev.type).peak_bytes / GiB
    save(a, R)
    if not a.quick:
        out["ours_bf16_graphed"] = attempt(lambda: train_ours(make(), B, T, dev, mode="graphed", steps=5))
        save(a, R)
    out["ours_nf4_checkpointing"] = attempt(lambda: train_ours(make("nf4", True), B, T, dev, steps=5))
    out["estimate_peak_gib_nf4_checkpointing"] = estimate_training(cfg, LoraConfig(), tc, dev.type, weights="nf4", checkpointing=True).peak_bytes / GiB
    out["ours_nf4"] = attempt(lambda: train_ours(make("nf4"), B, T, dev, steps=5))
    if not a.quick:
        out["ours_nf4_graphed"] = attempt(lambda: train_ours(make("nf4"), B, T, dev, mode="graphed", steps=5))
    out["ours_int8"] = attempt(lambda: train_ours(make("int8"), B, T, dev, steps=5))
    save(a, R)

    def make_peer():
        return peer_model(cfg, dev, bf16)
    out["peer_bf16"] = attempt(lambda: train_peer(make_peer, B, T, dev, steps=5))
    ours = {k: v for k, v in out.items() if k.startswith("ours_bf16") and isinstance(v, dict) and "tok_s" in v}
    if ours and "tok_s" in out["peer_bf16"]:
        best = max(ours, key=lambda k: ours[k]["tok_s"])
        out["best_bf16"] = best
        out["speedup_vs_peer_bf16"] = ours[best]["tok_s"] / out["peer_bf16"]["tok_s"]


def sec_decode(a, dev, R):
    cfg = a.cfg
    bf16 = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peer = peer_model(cfg, dev, bf16)
    ours = ours_from(peer, cfg, dev, bf16)
    new = a.new_tokens
    prompt = [list(range(1000, 1016))]
    sc = SamplingConfig(max_new_tokens=new, temperature=0, stop_at_eot=False)
    generate(ours, prompt, None, sc)  # capture the graph
    dev_sync(dev)
    t = time.perf_counter()
    ours_tokens = generate(ours, prompt, None, sc)[0]
    dev_sync(dev)
    ours_s = time.perf_counter() - t
    pr = torch.tensor(prompt, device=dev)
    with torch.no_grad():
        peer.generate(pr, max_new_tokens=8, do_sample=False, pad_token_id=50256)
        dev_sync(dev)
        t = time.perf_counter()
        ref = peer.generate(pr, attention_mask=torch.ones_like(pr), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, pad_token_id=50256)[0, 16:].tolist()
        dev_sync(dev)
        peer_s = time.perf_counter() - t
    agree = next((i for i, (p, q) in enumerate(zip(ours_tokens, ref)) if p != q), len(ref))
    ss = SamplingConfig(max_new_tokens=new, temperature=0.8, top_k=50, seed=3, stop_at_eot=False)
    generate(ours, prompt, None, ss)
    dev_sync(dev)
    t = time.perf_counter()
    generate(ours, prompt, None, ss)
    dev_sync(dev)
    sampled_s = time.perf_counter() - t
    offline = ours.__dict__.get("_offline_scheduler")  # the engine generate() ran on
    R["decode_b1"] = {"ours_tok_s": new / ours_s, "ours_tok_s_sampling_topk50": new / sampled_s,
                      "graphs": bool(offline and offline.runner.graphs),
                      "graph_capture_error": offline.runner.capture_error if offline else None,
                      "peer_tok_s": new / peer_s, "speedup": peer_s / ours_s,
                      "greedy_tokens_agree_first": agree, "new_tokens": new}
    save(a, R)

    # compare: base alone vs base + 3 adapters in one pass; PEFT's mixed batch vs its base alone
    names = []
    for i in range(3):
        n = f"cmp{i}"
        lora.add_adapter(ours, n, LoraConfig(r=8, targets=("attn.c_attn",)), seed=i)
        for layer in lora.lora_layers(ours).values():
            if layer.has(n):
                torch.nn.init.normal_(layer.weights(n)[1], std=0.02)
        names.append(n)
    sc = SamplingConfig(max_new_tokens=new, temperature=0.8, seed=1, stop_at_eot=False)

    def run(rows):
        generate(ours, prompt * len(rows), rows, sc)
        dev_sync(dev)
        t = time.perf_counter()
        for _ in range(3):
            generate(ours, prompt * len(rows), rows, sc)
        dev_sync(dev)
        return (time.perf_counter() - t) / 3

    base_s = run([None])
    mixed_s = run([None] + names)
    # no switch to time: every forward names its adapters (a route), nothing is made active
    R["compare_base_plus_3"] = {"ours_base_alone_s": base_s, "ours_base_plus_3_s": mixed_s,
                                "ours_ratio": mixed_s / base_s}
    save(a, R)
    try:
        import peft
        pm = peft_wrap(peer)
        for i in range(1, 4):
            pm.add_adapter(f"p{i}", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True,
                                                    init_lora_weights=False))
        pm.eval()
        prb = pr.repeat(4, 1)
        with torch.no_grad():
            def prun(ids, names_):
                kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=50256)
                if names_:
                    kw["adapter_names"] = names_
                pm.generate(input_ids=ids, **kw)
                dev_sync(dev)
                t = time.perf_counter()
                pm.generate(input_ids=ids, **kw)
                dev_sync(dev)
                return time.perf_counter() - t
            with pm.disable_adapter():
                pbase = prun(pr, None)
            pmixed = prun(prb, ["__base__", "p1", "p2", "p3"])
        R["compare_base_plus_3"].update({"peer_base_alone_s": pbase, "peer_mixed_s": pmixed, "peer_ratio": pmixed / pbase})
    except Exception as e:  # noqa: BLE001
        R["compare_base_plus_3"]["peer_error"] = f"{type(e).__name__}: {e}"[:400]
    del ours, peer
    reset_peak(dev)


def sec_quant_loss(a, dev, R):
    """Pre-train a gpt2-shaped model briefly on the bundled samples (so LoRA has a real base to adapt),
    then LoRA 100 steps on a bf16 base vs the same base quantized; compare validation loss."""
    from core.train.data import build_dataset, get_batch, list_samples, load_sample
    cfg = a.cfg
    bf16 = torch.bfloat16 if dev.type == "cuda" else torch.float32
    samples = list_samples()
    texts = [load_sample(s["name"]) for s in samples]
    ds = build_dataset(texts, [s["name"] for s in samples], 0.9)
    T, B = 128, 16
    import numpy as np
    torch.manual_seed(0)
    base = ours_random(cfg, dev, torch.float32)
    for p in base.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(base.parameters(), lr=6e-4, fused=dev.type == "cuda" or None)
    rng = np.random.default_rng(0)
    base.train()
    for i in range(a.pretrain_steps):
        x, y = get_batch(ds.train, B, T, rng, dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            loss = F.cross_entropy(base(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    pre_loss = float(loss)
    del opt
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    out = {"pretrain_steps": a.pretrain_steps, "pretrain_final_train_loss": pre_loss}
    val = torch.from_numpy(ds.val.astype(np.int64))
    for mode in ("bf16", "nf4", "int8"):
        m = GPT(cfg).to(dev)
        m.load_state_dict(state)
        for p in m.parameters():
            p.requires_grad_(False)
        m = m.to(bf16).eval()
        if mode != "bf16":
            quantize_base(m, mode)
        lora.add_adapter(m, "q", LoraConfig(r=8, alpha=16, targets=("attn.c_attn",)), seed=0)
        params = lora.lora_parameters(m, "q")
        opt = torch.optim.AdamW(params, lr=3e-4, fused=dev.type == "cuda" or None)
        rng = np.random.default_rng(1)
        m.train()
        for i in range(a.lora_steps):
            x, y = get_batch(ds.train, 4, T, rng, dev)
            loss = F.cross_entropy(m(x, "q").flatten(0, 1).float(), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        m.eval()
        with torch.no_grad():
            n = (len(val) - 1) // T * T
            xv = val[:n].view(-1, T).to(dev)
            yv = val[1:n + 1].view(-1, T).to(dev)
            vl = float(F.cross_entropy(m(xv, "q").flatten(0, 1).float(), yv.flatten()))
        out[f"val_loss_{mode}"] = vl
        del m, opt, params
        reset_peak(dev)
    out["nf4_vs_bf16_percent"] = 100 * (out["val_loss_nf4"] / out["val_loss_bf16"] - 1)
    out["int8_vs_bf16_percent"] = 100 * (out["val_loss_int8"] / out["val_loss_bf16"] - 1)
    R["quant_loss"] = out
    del base, state


def sec_checks(a, dev, R):
    """GPU-only fast paths equal the plain ones (fp32, so differences are not bf16 rounding)."""
    cfg = a.cfg
    ours = ours_random(cfg, dev, torch.float32, seed=3)
    for i, n in enumerate(("a", "b")):
        lora.add_adapter(ours, n, LoraConfig(r=8, targets=("attn.c_attn", "mlp.c_fc")), seed=i)
        for layer in lora.lora_layers(ours).values():
            if layer.has(n):
                torch.nn.init.normal_(layer.weights(n)[1], std=0.05)
    prompts = [[464, 2068, 7586, 21831], [464, 2068, 7586, 21831], [11, 12], [464, 2068, 7586, 21831]]
    names = [None, "a", "b", "a"]
    sc = SamplingConfig(max_new_tokens=48, temperature=0, stop_at_eot=False)
    plain = through_engine(ours, prompts, names, sc, graphs=False)
    graph, runner = through_engine(ours, prompts, names, sc, graphs=True, runner=True)  # a CUDA graph per bucket
    graph_again = generate(ours, prompts, names, sc)  # the offline scheduler kept on the model
    alone = [through_engine(ours, [p], [n], sc, graphs=False)[0] for p, n in zip(prompts, names)]
    out = {"graph_decode_equals_plain": graph == plain and graph_again == plain,
           "graphs_captured": bool(runner.graphs and runner._buckets), "graph_capture_error": runner.capture_error,
           "mixed_batch_equals_alone": plain == alone,
           "adapters_change_output": plain[0] != plain[1]}
    sc = SamplingConfig(max_new_tokens=48, temperature=0.9, seed=5, stop_at_eot=False)
    out["graph_sampling_equals_plain"] = (through_engine(ours, prompts, names, sc, graphs=True)
                                          == through_engine(ours, prompts, names, sc, graphs=False))
    x, y = batch(2, 64, dev)
    ours.train()
    eager = F.cross_entropy(ours(x, "a").flatten(0, 1).float(), y.flatten())
    if not a.quick:
        compiled = torch.compile(lambda x, y: F.cross_entropy(ours(x, "a").flatten(0, 1).float(), y.flatten()))(x, y)
        out["compiled_loss_abs_diff"] = abs(float(eager) - float(compiled))
    ours.checkpointing = True
    out["checkpointing_loss_abs_diff"] = abs(float(eager) - float(F.cross_entropy(ours(x, "a").flatten(0, 1).float(), y.flatten())))
    out.update(trainer_graphs_check(cfg, dev, steps=3 if a.quick else 8))
    R["checks"] = out
    del ours
    reset_peak(dev)


def through_engine(model, prompts, names, sc, graphs: bool, runner: bool = False):
    """Each prompt + adapter as one request of a thread-less decode scheduler; graphs: captured steps (CUDA)."""
    from core.generate.scheduler import DecodeScheduler
    need = max(map(len, prompts)) + sc.max_new_tokens
    sched = DecodeScheduler(model, max_rows=len(prompts), max_len=need, thread=False,
                            graphs=graphs and model.device.type == "cuda")
    reqs = [sched.submit(p, [n], sc) for p, n in zip(prompts, names)]
    sched.run_until_idle()
    got = [r.result(0)[0] for r in reqs]
    return (got, sched.runner) if runner else got


def trainer_graphs_check(cfg, dev, steps):
    """The studio's/CLI's Trainer with CUDA-graphed micro-steps vs eager: same losses, and its speed."""
    import tempfile
    from core.train.data import build_dataset, list_samples, load_sample
    from core.train.loop import train_chunk
    from core.train.trainer import Trainer
    samples = list_samples()
    ds = build_dataset([load_sample(s["name"]) for s in samples], [s["name"] for s in samples], 0.9)
    res, losses = {}, {}
    for graphs in (True, False):
        m = ours_random(cfg, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, seed=7)
        tc = TrainConfig(steps=steps, batch_size=4, seq_len=128, grad_accum=4, eval_interval=0,
                         checkpoint_interval=0, cuda_graphs=graphs)
        with tempfile.TemporaryDirectory() as d:
            events = train_chunk(Trainer(m, ds, LoraConfig(), tc, "g", Path(d) / "run", base_id="bench")).events
        steps_ev = [e for e in events if e["type"] == "step"]
        losses[graphs] = [e["loss"] for e in steps_ev]
        key = "trainer_graphs" if graphs else "trainer_eager"
        res[f"{key}_tok_s"] = max(e["tokens_per_sec"] for e in steps_ev[1:]) if len(steps_ev) > 1 else None
        res[f"{key}_notes"] = [e["message"] for e in events if e["type"] == "info"]
        del m
    res["trainer_graphs_max_loss_diff"] = max(abs(p - q) for p, q in zip(losses[True], losses[False]))

    # the studio's normal case: users generate while another starts a graphed training run
    import threading
    m = ours_random(cfg, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, seed=7)
    errors, stop = [], threading.Event()

    def gen_loop():
        while not stop.is_set():
            try:
                generate(m, [[464, 2068, 7586]], [None], SamplingConfig(max_new_tokens=16, temperature=0.8))
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(f"{type(e).__name__}: {e}"[:200])
                return
    threads = [threading.Thread(target=gen_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        tc = TrainConfig(steps=steps, batch_size=4, seq_len=128, grad_accum=2, eval_interval=0,
                         checkpoint_interval=0, cuda_graphs=True)
        with tempfile.TemporaryDirectory() as d:
            events = train_chunk(Trainer(m, ds, LoraConfig(), tc, "g2", Path(d) / "run", base_id="bench")).events
    finally:
        stop.set()
        for t in threads:
            t.join()
    res["concurrent_generation_errors"] = errors
    res["concurrent_trainer_notes"] = [e["message"] for e in events if e["type"] in ("info", "error")]
    res["concurrent_trainer_finished"] = any(e["type"] == "done" for e in events)
    return res


def sec_scheduler(a, dev, R):
    """The classroom case of issue 13 on a GPU: `a.sched_requests` concurrent requests (one row each) of
    `a.sched_tokens` new tokens through one DecodeScheduler, against one request alone through it.
    Goals: tokens/s at least 20x the solo request's, p95 per-token latency at most 2x solo's. The
    per-token latency is the time between a request's consecutive decode steps (step end times, so
    reader threads play no part). On the CPU this is only a smoke check with smaller counts."""
    from core.generate.scheduler import DecodeScheduler
    from core.model.weights import load_base
    on_gpu = dev.type == "cuda"
    n, new = a.sched_requests, a.sched_tokens
    if not on_gpu:  # the CPU fallback: checks the section runs, measures nothing the goals are about
        n, new = min(n, 8), min(new, 16)
    if a.model == "tiny":
        model = load_base("tiny", dev, torch.bfloat16 if on_gpu else torch.float32)
    else:
        model = ours_random(a.cfg, dev, torch.bfloat16 if on_gpu else torch.float32)
    prompt_len = 16
    sched = DecodeScheduler(model, max_rows=n, max_len=prompt_len + new + 1, max_queue=n, max_rows_per_user=1)
    ends: list[float] = []  # the end time of every decode step
    step = sched._step

    def timed_step():
        step()
        dev_sync(dev)
        ends.append(time.perf_counter())
    sched._step = timed_step
    cfgs = [SamplingConfig(max_new_tokens=new, temperature=0.8, top_k=50, seed=i, stop_at_eot=False) for i in range(n)]
    prompts = [[(1000 + 37 * i + j) % 50257 for j in range(prompt_len)] for i in range(n)]

    def run(k: int):
        """k requests submitted at once; (wall s, [per-token gaps of every request])."""
        ends.clear()
        dev_sync(dev)
        t0 = time.perf_counter()
        reqs = [sched.submit(prompts[i], [None], cfgs[i]) for i in range(k)]
        for r in reqs:
            r.result(600)
        wall = time.perf_counter() - t0
        first = sched.step_count - len(ends) + 1  # step_count of ends[0]
        gaps = []
        for r in reqs:
            times = ends[r.first_step - first:r.last_step - first + 1]
            gaps += [b - q for q, b in zip(times, times[1:])]
        return wall, gaps

    try:
        run(1)  # warm-up (kernels, allocator)
        run(min(n, 4))
        solo_wall, solo_gaps = min((run(1) for _ in range(3)), key=lambda w: w[0])
        all_wall, all_gaps = run(n)
        all_wall, all_gaps = min([(all_wall, all_gaps), run(n)], key=lambda w: w[0])
    finally:
        sched.close()
    solo_tok_s, all_tok_s = new / solo_wall, n * new / all_wall
    p95 = lambda xs: sorted(xs)[min(len(xs) - 1, int(0.95 * len(xs)))]  # noqa: E731
    solo_p95, all_p95 = p95(solo_gaps), p95(all_gaps)
    out = {"requests": n, "new_tokens": new, "prompt_tokens": prompt_len, "model": a.model,
           "dtype": str(model.dtype).replace("torch.", ""), "device": str(dev),
           "solo_tok_s": solo_tok_s, "concurrent_tok_s": all_tok_s, "tok_s_ratio": all_tok_s / solo_tok_s,
           "solo_token_latency_p95_ms": solo_p95 * 1e3, "concurrent_token_latency_p95_ms": all_p95 * 1e3,
           "token_latency_p95_ratio": all_p95 / solo_p95, "goal_tok_s_ratio": 20, "goal_latency_ratio": 2,
           "graphs": sched.runner.graphs, "graph_capture_error": sched.runner.capture_error}
    if on_gpu and n >= 64 and new >= 128:
        out["met"] = {"tok_s_ratio": out["tok_s_ratio"] >= 20, "latency_ratio": out["token_latency_p95_ratio"] <= 2}
    else:
        out["note"] = (f"smoke check on {dev.type} ({n} requests x {new} tokens): unmeasured on a GPU; the goals "
                       f"are about 64 x 128 on an H200")
    R["scheduler"] = out
    print(f"[scheduler] {n} x {new} tokens on {dev}: {all_tok_s:.0f} tok/s vs {solo_tok_s:.0f} alone "
          f"({out['tok_s_ratio']:.1f}x, goal 20x); p95 per-token {all_p95 * 1e3:.1f} ms vs {solo_p95 * 1e3:.1f} ms "
          f"({out['token_latency_p95_ratio']:.2f}x, goal <= 2x)", flush=True)
    del model
    reset_peak(dev)


def sec_eval_compare(a, dev, R):
    """A 16-token compare's latency idle and while another thread evaluates 9 models (the base + 8 adapters) at
    context 1024 over 32K tokens on the same Engine (gpt2 shapes, random weights). Goal (issue 28, set on a
    CPU): at most 3x idle. GPU only: on a CPU bench/eval_interference.py measures it."""
    if dev.type != "cuda":
        R["eval_compare"] = {"measured": False, "reason": "no GPU (on a CPU: bench/eval_interference.py)"}
        return
    import statistics
    import tempfile
    import threading
    import numpy as np
    from core.engine import Engine
    from eval_interference import compare_once, make_library
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-random"
        peer_model(a.cfg, torch.device("cpu"), torch.float32).save_pretrained(folder)
        engine = Engine(dev, library_dir=Path(tmp) / "lib")
        adapters = make_library(engine, str(folder), 8)
        compare_once(engine, 16)  # warm-up: the scheduler, its graphs, the adapters' first load
        idle = statistics.median(compare_once(engine, 16) for _ in range(5))
        ids = np.random.default_rng(0).integers(0, 50256, 32768 + 1)
        done, eval_s = threading.Event(), []

        def evaluate():
            t = time.perf_counter()
            engine.evaluate(ids, [None, *adapters], seq_len=1024, max_tokens=32768)
            eval_s.append(time.perf_counter() - t)
            done.set()
        threading.Thread(target=evaluate, daemon=True).start()
        busy = []
        while not done.is_set() and len(busy) < 20:
            busy.append(compare_once(engine, 16))
        done.wait(600)
        engine.close()
    during = statistics.median(busy) if busy else float("nan")
    R["eval_compare"] = {"measured": bool(busy), "compare_idle_ms": idle * 1e3, "compare_during_eval_ms": during * 1e3,
                         "ratio": during / idle, "compares_during_eval": len(busy),
                         "eval_s": eval_s[0] if eval_s else None, "goal_ratio": 3}


def summary(R) -> list[str]:
    """One line per issue-28 goal: the figure, or "not measured" and why."""
    lines = []
    s = R.get("scheduler")
    if s and s.get("met") is not None:
        lines.append(f"64 concurrent gpt2 requests: {s['concurrent_tok_s']:.0f} tok/s = {s['tok_s_ratio']:.1f}x one "
                     f"request's (goal >= 20x); p95 per-token latency {s['concurrent_token_latency_p95_ms']:.1f} ms = "
                     f"{s['token_latency_p95_ratio']:.2f}x solo (goal <= 2x); CUDA graphs: {s['graphs']}")
    else:
        lines.append("64 concurrent gpt2 requests: not measured (" + (s.get("note", "") if s else
                     R["errors"].get("scheduler", "section not run")[-200:]) + ")")
    d = R.get("decode_b1")
    if d and R.get("device") != "cpu":
        lines.append(f"batch-1 decode through the one engine: {d['ours_tok_s']:.0f} tok/s (goal >= 1,500 on an "
                     f"H200); CUDA graphs: {d['graphs']}")
    else:
        lines.append("batch-1 decode through the one engine: not measured (" + ("no GPU" if d else
                     R["errors"].get("decode", "section not run")[-200:]) + ")")
    e = R.get("eval_compare")
    if e and e.get("measured"):
        lines.append(f"compare during an evaluation: {e['compare_during_eval_ms']:.0f} ms vs {e['compare_idle_ms']:.0f} "
                     f"ms idle = {e['ratio']:.1f}x (goal <= 3x)")
    else:
        lines.append("compare during an evaluation: not measured (" + (e.get("reason", "no compare ran during it")
                     if e else R["errors"].get("eval_compare", "section not run")[-200:]) + ")")
    return lines


SECTIONS = {"checks": sec_checks, "train": sec_train, "decode": sec_decode, "xl": sec_xl, "quant": sec_quant_loss,
            "scheduler": sec_scheduler, "eval_compare": sec_eval_compare}


def save(a, R):
    Path(a.out).write_text(json.dumps(R, indent=2, default=str))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU: checks the script runs")
    ap.add_argument("--only", default="checks,decode,scheduler,eval_compare",
                    help="sections, in order (also: xl, quant, train; default: issue 28's)")
    ap.add_argument("--model", default="gpt2", choices=["gpt2", "tiny"],
                    help="the scheduler section's model: gpt2 shapes, random weights (default), or the tiny preset")
    ap.add_argument("--sched-requests", type=int, default=64, help="scheduler: concurrent requests (default 64)")
    ap.add_argument("--sched-tokens", type=int, default=128, help="scheduler: new tokens each (default 128)")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    if a.quick:
        a.cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64)
        a.xl_cfg = GPTConfig(n_layer=3, n_head=2, n_embd=64)
        a.small, a.large, a.steps, a.new_tokens, a.pretrain_steps, a.lora_steps = (2, 32), (2, 64), 2, 16, 5, 5
    else:
        a.cfg, a.xl_cfg = PRESETS["gpt2"], PRESETS["gpt2-xl"]
        a.small, a.large, a.steps, a.new_tokens, a.pretrain_steps, a.lora_steps = (4, 128), (16, 1024), 10, 128, 300, 100
    torch.backends.cuda.matmul.allow_tf32 = True
    R = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
         "torch": torch.__version__, "errors": {}}
    try:
        import transformers, peft
        R["transformers"], R["peft"] = transformers.__version__, peft.__version__
    except ImportError:
        pass
    for name in a.only.split(","):
        t = time.perf_counter()
        try:
            SECTIONS[name](a, dev, R)
        except Exception as e:  # noqa: BLE001 - recorded, the next section still runs
            R["errors"][name] = traceback.format_exc()[-1500:]
            print(f"[{name}] failed: {e}", flush=True)
        R.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {R['section_seconds'][name]} s", flush=True)
        save(a, R)
    print(json.dumps(R, indent=2, default=str))
    for line in summary(R):
        print(f"[summary] {line}", flush=True)


if __name__ == "__main__":
    main()
