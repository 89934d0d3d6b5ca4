"""Time the target's draw at every tree node: the engine's sampler against torch.multinomial with a full
sort for top-p (the textbook way). CPU, 49,152-token rows, median of 20 calls.

    python -m scripts.draw_cost
"""

import time
from functools import partial

import torch

from engine.config import SamplingConfig
from engine.verify import draw_tokens


def multinomial_draw(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits / sampling.temperature, dim=-1)  # (n, V)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(dim=-1) - sorted_p >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    generator = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}")
    for nodes in (1, 9, 19):
        logits = torch.randn(nodes, 49_152, generator=generator) * 3  # (nodes, vocab)
        for sampling in (SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_p=0.9)):
            old = median_ms(partial(multinomial_draw, logits, sampling, generator))
            new = median_ms(partial(draw_tokens, logits, sampling, generator))
            print(f"{nodes:3d} nodes  T={sampling.temperature:g} top_p={sampling.top_p:g}  "
                  f"multinomial {old:6.2f} ms   engine {new:6.2f} ms")
