"""Where an int8 forward's time goes on this machine: the C products against oneDNN's `torch._int_mm`
on the default model's layer shapes, the C attention against the float64 torch attention, the C token
choices against torch's, and whole forwards through the C kernels against the same steps in torch ops.
Median microseconds or ms.

    python -m scripts.int8_costs [--threads 2]
"""

import argparse
import time

import numpy as np
import torch

from engine.backend import variant
from engine.kernels import kernel_status, row_kernels
from engine.kv import new_cache
from engine.lean import LeanForward, _exact_attention
from engine.models import ModelSpec, load_target
from engine.tree import make_tree
from engine.verify import target_forward, tree_attention_mask

CONTEXT = 256


def median_us(fn, *args, repeats: int = 50) -> float:
    """Median wall time of fn(*args) in microseconds, after three warm-up calls."""
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def verify_step(model, tree, mask, cache) -> None:
    """One forward over a tree after the cached context, then the cache forgets it."""
    target_forward(model, tree.tokens, CONTEXT + tree.depths, mask, cache)
    cache.crop(-tree.size)


class Weight:  # what RowKernels.int_mm reads
    def __init__(self, n: int, k: int):
        self.qweight_t = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = row_kernels()
    print(f"threads {torch.get_num_threads()}; kernels: {kernel_status()}")
    if rows is None:
        return
    torch.manual_seed(0)
    print("\nint8 products, us (C / torch._int_mm):")
    for n, k in ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)):
        layer = Weight(n, k)
        cells = []
        for m in (1, 4, 16, 32):
            q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            ours = median_us(rows.int_mm, q, layer)
            theirs = median_us(torch._int_mm, q, layer.qweight_t)
            cells.append(f"M={m} {ours:.0f}/{theirs:.0f}")
        print(f"  {n}x{k}: " + ", ".join(cells))
    print(f"\nattention of one layer after {CONTEXT} tokens (9 heads, 3 kv heads, 64 dims), us (C / float64 torch):")
    for n in (1, 8, 16, 32):
        q = torch.randn(9, n, 64)
        keys, values = torch.randn(3, 512, 64), torch.randn(3, 512, 64)
        visible = None if n == 1 else (torch.rand(n, CONTEXT + n) > 0.1)
        end = CONTEXT + n
        rows_visible = None if visible is None else visible.to(torch.uint8)
        ours = median_us(rows.attention, q, keys, values, end, rows_visible, 0.125)
        k64, v64 = keys[None, :, :end].double(), values[None, :, :end].double()
        mask = None if visible is None else visible[None, None]
        theirs = median_us(_exact_attention, q[None], k64, v64, mask, 0.125)
        print(f"  n={n}: {ours:.0f} / {theirs:.0f}")
    print("\nchoosing tokens, us (C / torch):")
    logits, draft = torch.randn(5, 49152), torch.randn(4, 8192)
    print(f"  greedy draw, 5 x 49152: {median_us(rows.argmax, logits):.0f} / {median_us(torch.argmax, logits, -1):.0f}")
    theirs = median_us(lambda x: torch.log_softmax(x, -1).topk(4, -1), draft)
    print(f"  draft top-4 log-softmax, 4 x 8192: {median_us(rows.top_logsoftmax, draft, 4):.0f} / {theirs:.0f}")
    fp32, _ = load_target(ModelSpec(None, "float32", "cpu", None), progress=False)
    model = variant(fp32, "int8")
    forwards = {"C kernels": model.lean, "torch ops": LeanForward(model, kernels=False)}
    context = torch.arange(CONTEXT) % 4000 + 100
    print(f"\nint8 forward after {CONTEXT} tokens, ms by new tokens (a one-level tree):")
    for name, forward in forwards.items():
        model.lean = forward
        cache = new_cache(model)
        target_forward(model, context, torch.arange(CONTEXT), None, cache, logits=False)
        cells = []
        for n in (1, 4, 8, 16, 32, 64):
            tree = make_tree(context[:n], torch.tensor([-1] + [0] * (n - 1)), torch.tensor([0] + [1] * (n - 1)),
                             torch.zeros(n), max_depth=1)  # fmt: skip
            mask = tree_attention_mask(tree, CONTEXT, torch.float32) if n > 1 else None
            cells.append(f"{n}: {median_us(verify_step, model, tree, mask, cache, repeats=15) / 1000:.1f}")
        print(f"  {name}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
