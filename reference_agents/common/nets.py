"""Network builders shared by the agents."""

from __future__ import annotations

import torch
from torch import nn


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: tuple[int, ...] = (64, 64),
    activation: type[nn.Module] = nn.Tanh,
    out_gain: float | None = None,
) -> nn.Sequential:
    """A plain MLP; `out_gain` applies CleanRL-style orthogonal init (gain sqrt(2), output `out_gain`)."""
    layers: list[nn.Module] = []
    dims = (in_dim, *hidden)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), activation()]
    layers.append(nn.Linear(dims[-1], out_dim))
    net = nn.Sequential(*layers)
    if out_gain is not None:
        linears = [m for m in net if isinstance(m, nn.Linear)]
        for i, layer in enumerate(linears):
            gain = out_gain if i == len(linears) - 1 else 2**0.5
            nn.init.orthogonal_(layer.weight, gain)
            nn.init.zeros_(layer.bias)
    return net


def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * online + (1 - tau) * target, parameters and buffers alike."""
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.lerp_(o, tau)
        for t, o in zip(target.buffers(), online.buffers()):
            t.copy_(o)
