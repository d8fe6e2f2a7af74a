"""Decode speed: our KV-cache generation vs transformers `generate`, same random weights, one run.

    python bench/generate.py [--device cpu|cuda] [--new 64] [--batches 1,4] [--repeats 3]
    python bench/generate.py --bf16    # also ours with a bf16 base against the peer in --dtype, in the same run
"""
from __future__ import annotations

import argparse
import time

import torch

from common import machine, random_hf_checkpoint, table, timed

from core.generate.sampling import SamplingConfig, generate
from core.model.weights import load_base


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (alternating), best kept")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--bf16", action="store_true",
                    help="also time ours with the base in bf16 (--precision bf16), and compare its greedy tokens")
    args = ap.parse_args()
    import transformers

    dtype = getattr(torch, args.dtype)
    folder = random_hf_checkpoint()
    ours = load_base(str(folder), device=args.device, dtype=dtype)
    ours16 = load_base(str(folder), device=args.device, dtype=torch.bfloat16) if args.bf16 else None
    peer = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    cfg = SamplingConfig(max_new_tokens=args.new, temperature=0, stop_at_eot=False)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        prompt = torch.randint(0, 50000, (B, args.prompt), generator=torch.Generator().manual_seed(B))
        run_ours = lambda: generate(ours, prompt.tolist(), None, cfg)
        pr = prompt.to(args.device)

        def run_peer():
            with torch.no_grad():
                peer.generate(pr, attention_mask=torch.ones_like(pr), max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=False, pad_token_id=50256)
        run_16 = lambda: generate(ours16, prompt.tolist(), None, cfg)  # noqa: E731
        run_ours(), run_peer(), ours16 is not None and run_16()  # warm-up
        t_ours, t_peer, t_16 = [], [], []
        for _ in range(args.repeats):  # alternate to share the machine's noise
            t_ours.append(timed(run_ours, args.device))
            t_peer.append(timed(run_peer, args.device))
            if ours16 is not None:
                t_16.append(timed(run_16, args.device))
        same = generate(ours, prompt[:1].tolist(), None, cfg)[0] == peer.generate(
            pr[:1], attention_mask=torch.ones_like(pr[:1]), max_new_tokens=args.new, min_new_tokens=args.new,
            do_sample=False, pad_token_id=50256)[0, args.prompt:].tolist()
        ours_tps = B * args.new / min(t_ours)
        peer_tps = B * args.new / min(t_peer)
        row = [B, f"{ours_tps:,.0f}", f"{peer_tps:,.0f}", f"{ours_tps / peer_tps:.2f}x", same]
        if ours16 is not None:
            tps16 = B * args.new / min(t_16)
            one = prompt[:1].tolist()
            same16 = generate(ours16, one, None, cfg)[0] == generate(ours, one, None, cfg)[0]
            row += [f"{tps16:,.0f}", f"{tps16 / peer_tps:.2f}x", same16]
        rows.append(row)
    print(f"decode, gpt2 124M shape (random weights), prompt {args.prompt}, {args.new} new tokens, greedy, "
          f"{args.dtype}, {args.device}; {machine()}; {time.strftime('%Y-%m-%d')}")
    head = ["batch", "ours new tok/s", "transformers new tok/s", "ratio", "same tokens"]
    head += ["ours bf16 base tok/s", "bf16 / peer", "bf16 greedy = ours"] if args.bf16 else []
    print(table(rows, head))


if __name__ == "__main__":
    main()
