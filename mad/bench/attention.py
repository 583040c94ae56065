"""CPU bf16 attention: explicit matmuls with an fp32 softmax against the fused kernel.

    python -m mad.bench.attention [--batch 16] [--heads 4] [--head-dim 32] [--repeats 5]

Times forward + backward of both, alternating so that both see the same machine load, at
the query x key sizes training meets (decoder self-attention, cross-attention to the stride-16
memory and to the fine memory level, folded segmentation sequences); prints the median of
each, their ratio and which one `model.transformer.Attention` picks (`matmuls_pay`). With
--dropout, both apply attention dropout (the CPU's fused kernel then falls back to math).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from model.transformer import matmul_attention, matmuls_pay

SHAPES = [  # (what, queries, keys) per image and head, tiny model at 256 x 256
    ("detection self-attention", 100, 100),
    ("keypoints x stride-16 memory", 224, 256),
    ("keypoints x both levels", 224, 1280),
    ("detection x both levels", 100, 1280),
    ("segmentation x stride-16 memory", 1048, 256),
    ("segmentation x both levels", 1048, 1280),
]


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, drop: float):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)


def matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, drop: float):
    return matmul_attention(q, k, v, mask, drop, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="images (folded sequences)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dropout", type=float, default=0.0, help="tiny: 0, the others 0.1")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, bf16 autocast, dropout {args.dropout}")
    print(f"{'shape':34} {'L x N':>12} {'matmul ms':>10} {'fused ms':>9} {'ratio':>6}  picked")
    for what, queries, keys in SHAPES:
        shape = (args.batch, args.heads)
        q = torch.randn(*shape, queries, args.head_dim, requires_grad=True)
        k = torch.randn(*shape, keys, args.head_dim, requires_grad=True)
        v = torch.randn(*shape, keys, args.head_dim, requires_grad=True)
        mask = torch.ones(args.batch, 1, 1, keys, dtype=torch.bool)
        times: dict[str, list[float]] = {"matmul": [], "fused": []}
        for _ in range(args.repeats + 1):  # the first round warms up
            arms: tuple[tuple[str, Attend], ...] = (("matmul", matmuls), ("fused", fused))
            for name, fn in arms:
                tic = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, args.dropout)
                out.float().sum().backward()
                times[name].append(time.perf_counter() - tic)
        matmul, fast = (statistics.median(times[n][1:]) * 1e3 for n in ("matmul", "fused"))
        picked = "matmul" if matmuls_pay(queries, keys) else "fused"
        size = f"{queries} x {keys}"
        print(f"{what:34} {size:>12} {matmul:10.1f} {fast:9.1f} {matmul / fast:6.2f}  {picked}")


if __name__ == "__main__":
    main()
