"""Which low-memory optimizer setups still learn at lr 1e-5: the candidates for the full fine-tuning default.

    python benchmarks/lean_optimizers.py [--steps 200] [--out benchmarks/lean_optimizers.json]

One small random Llama (vocab 2000, hidden 64, 2 layers), the same 8 batches of 4 x 64 random tokens in
turn, AdamW at lr 1e-5 (betas 0.9/0.999, no weight decay), seed 0; the loss drop is the mean of the first
8 steps minus the mean of the last 8. Candidates missing a package (bitsandbytes, torchao) are skipped.
Loss numbers are exact on any machine; seconds are wall-clock on whatever machine runs it (torchao's
optimizers compile their step with torch.compile, which dominates on CPU).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

# name: (bytes per parameter for weights + gradients + state, needs, what)
CANDIDATES = {
    "float32 master + AdamW": (16, None, "float32 weights and state, bf16 autocast"),
    "bf16 + Kahan AdamW (torch-optimi)": (10, "optimi", "bf16 weights, state and compensation"),
    "bf16 + stochastic rounding AdamW (torchao _AdamW)": (8, "torchao", "bf16 weights and state"),
    "bf16 + 8-bit AdamW + stochastic rounding (torchao)": (6, "torchao", "8-bit state, bf16 weights"),
    "bf16 + AdamW (pure bf16)": (8, None, "bf16 weights and state"),
    "bf16 + 8-bit AdamW (bitsandbytes)": (6, "bitsandbytes", "8-bit state, bf16 weights"),
    "bf16 + 8-bit AdamW (torchao)": (6, "torchao", "8-bit state, bf16 weights"),
}


def optimizer(name: str, params, lr: float):
    kwargs = {"lr": lr, "weight_decay": 0.0}
    if name == "float32 master + AdamW" or name == "bf16 + AdamW (pure bf16)":
        return torch.optim.AdamW(params, betas=(0.9, 0.999), eps=1e-8, **kwargs)
    if name.startswith("bf16 + Kahan"):
        from optimi import AdamW

        return AdamW(params, betas=(0.9, 0.999), eps=1e-8, kahan_sum=True, **kwargs)
    if name.startswith("bf16 + stochastic"):
        from torchao.optim import _AdamW

        return _AdamW(params, bf16_stochastic_round=True, **kwargs)
    if "torchao" in name:
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, bf16_stochastic_round="stochastic" in name, **kwargs)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, **kwargs)


def run(name: str, base: torch.nn.Module, batches: list[torch.Tensor], steps: int, lr: float) -> dict:
    model = copy.deepcopy(base)
    master = name.startswith("float32")
    if not master:
        model = model.to(torch.bfloat16)
    opt = optimizer(name, model.parameters(), lr)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        ids = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16) if master else nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    return {
        "name": name,
        "first": first,
        "last": last,
        "drop": first - last,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "lean_optimizers.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = LlamaConfig(
        vocab_size=2000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).float()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 2000, (4, 64), generator=generator) for _ in range(8)]
    results = []
    for name, (_, package, _) in CANDIDATES.items():
        if package and importlib.util.find_spec(package) is None:
            print(f"skipped (no {package}): {name}")
            continue
        results.append(run(name, base, batches, args.steps, args.lr))
    reference = results[0]["drop"]
    print(
        "| setup | bytes/param (weights+grads+state) | first loss | last loss | drop | drop / float32's | seconds |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        size = CANDIDATES[r["name"]][0]
        print(
            f"| {r['name']} | {size} | {r['first']:.5f} | {r['last']:.5f} | {r['drop']:.5f} | "
            f"{r['drop'] / reference:.2f} | {r['seconds']:.1f} |"
        )
    Path(args.out).write_text(
        json.dumps({"steps": args.steps, "lr": args.lr, "results": results}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
