"""Audit overhead of measuring loss terms: `python benchmarks/term_gradients.py` (CPU time, one thread, best of 5).

one-term: an MLP whose loss is one term, so its gradient is read from the real backward (no extra pass).
summed-over-steps: a recurrent loss summed over T steps (every step's loss depends on all earlier ones): its T
addends are one term, measured in one pass instead of T.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

import gradaudit


def best_time(step: Callable[[], None], rounds: int = 5, steps: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(steps):
            step()
        best = min(best, (time.process_time() - start) / steps)
    return best


def compare(name: str, step: Callable[[], None]) -> None:
    step()
    plain = best_time(step)
    with gradaudit.audit():
        audited = best_time(step)
    print(f"{name}: plain {plain * 1e3:.1f} ms, audited {audited * 1e3:.1f} ms per step (x{audited / plain:.2f})")


def one_term() -> Callable[[], None]:
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(256, 256), nn.ReLU())], nn.Linear(256, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(512, 256)

    def step() -> None:
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def summed_over_steps(steps: int = 300) -> Callable[[], None]:
    cell, head = nn.Linear(16, 8), nn.Linear(8, 1)
    optimizer = torch.optim.SGD([*cell.parameters(), *head.parameters()], lr=1e-3)
    inputs = torch.randn(steps, 4, 8)

    def step() -> None:
        hidden, loss = torch.zeros(4, 8), torch.zeros(())
        for x in inputs:
            hidden = torch.tanh(cell(torch.cat([x, hidden], dim=1)))
            step_loss = head(hidden).pow(2).mean()
            loss = loss + step_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    compare("one-term", one_term())
    compare("summed-over-steps (T=300)", summed_over_steps())
