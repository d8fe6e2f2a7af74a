"""Adapter hot-swap: how long the engine takes to switch the shared base between two library adapters,
and a short forward pass after each switch, one run on this machine.

A switch is `Engine.load(name)`: the adapter is already loaded, its files are re-checked
(so an adapter replaced in the library is noticed) and the name to route rows to comes back; the base
weights are never touched. The first call per adapter reads it from the library (shown separately).
The target is < 50 ms per switch, so picking an adapter in the studio feels instant.

    python bench/switch.py                          # the tiny preset (random, 2 layers)
    python bench/switch.py --model gpt2 --rounds 41 # a random gpt2-shaped (124M) checkpoint

Moved here from tests/test_engine.py, which printed these timings without asserting them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, random_hf_checkpoint, table  # noqa: E402

import torch  # noqa: E402

from core.engine import Engine  # noqa: E402
from core.lora.layers import add_adapter, lora_parameters  # noqa: E402
from core.lora.config import LoraConfig
from core.model.weights import load_base  # noqa: E402

ADAPTERS = {"x": LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc")),
            "y": LoraConfig(r=2, alpha=4.0, targets=("attn.c_proj",))}


def library_with_two_adapters(device: str, model: str, folder: Path) -> Engine:
    """An engine whose library holds adapters x and y (random A and B, so they change the output)."""
    weights = random_hf_checkpoint(folder=folder / "gpt2") if model == "gpt2" else None
    source = load_base(str(weights) if weights else model, device="cpu")
    for i, (name, lcfg) in enumerate(ADAPTERS.items()):
        add_adapter(source, name, lcfg, seed=i)
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for p in lora_parameters(source, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    eng = Engine(device, folder / "lib")
    for name, lcfg in ADAPTERS.items():
        eng.library.save(source, name, name, lcfg, model)
    eng.base(model, weights=weights)
    return eng


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="tiny", choices=["tiny", "gpt2"])
    ap.add_argument("--rounds", type=int, default=21, help="switches timed (alternating x and y)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
        eng = library_with_two_adapters(args.device, args.model, Path(tmp))
        model = eng.shared_model()
        ids = torch.tensor([[464, 2068]], device=model.device)
        first = {}
        for name in ADAPTERS:  # the first call reads each adapter from the library
            t0 = time.perf_counter()
            eng.load(name)
            first[name] = time.perf_counter() - t0
        switch, forward = [], []
        with torch.no_grad():
            for i in range(args.rounds):
                t0 = time.perf_counter()
                routed = eng.load("x" if i % 2 else "y")
                t1 = time.perf_counter()
                model(ids, routed)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                switch.append(t1 - t0)
                forward.append(time.perf_counter() - t1)
        loaded = len(eng.loaded())
    ms = lambda s: f"{s * 1e3:.3f}"
    print(f"Adapter switch on {args.model}, {machine()}, {args.rounds} switches, {loaded} adapters loaded")
    print(table([["first load (x, y)", f"{ms(first['x'])}, {ms(first['y'])}", ""],
                 ["switch (median)", ms(statistics.median(switch)), "< 50"],
                 ["2-token forward after it (median)", ms(statistics.median(forward)), ""]],
                ["", "ms", "target ms"]))


if __name__ == "__main__":
    main()
