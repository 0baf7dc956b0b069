"""The training steps the benchmarks time: plain torch.nn models on random data (no downloads).

Each `make_*` returns a `step()` that runs one forward, backward and optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

Step = Callable[[], None]


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2's layout (12 layers, d768, 12 heads, vocabulary 50257 by default), weights tied."""

    def __init__(self, vocabulary: int = 50257, context: int = 1024, width: int = 768, layers: int = 12) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocabulary, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, width // 64) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocabulary, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def language_model_step(model: GPT, optimizer: torch.optim.Optimizer, batch: int, seq: int) -> None:
    tokens = torch.randint(0, model.lm_head.out_features, (batch, seq + 1))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def make_transformer(
    layers: int = 12, width: int = 768, batch: int = 4, seq: int = 128, vocabulary: int = 50257
) -> Step:
    model = GPT(vocabulary=vocabulary, width=width, layers=layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    return lambda: language_model_step(model, optimizer, batch, seq)


def mlp(inputs: int, outputs: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, outputs)
    )


def make_actor_critic(observations: int = 3, actions: int = 1, batch: int = 64, hidden: int = 64) -> Step:
    """A PPO update of the reference agents' size: clipped policy loss, value loss and entropy bonus, one Adam."""
    actor, critic = mlp(observations, actions, hidden), mlp(observations, 1, hidden)
    log_std = nn.Parameter(torch.zeros(actions))
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters(), log_std], lr=3e-4)
    obs, act = torch.randn(batch, observations), torch.randn(batch, actions)
    advantages, returns, old_log_prob = torch.randn(batch), torch.randn(batch), torch.randn(batch) - 1.0

    def step() -> None:
        dist = torch.distributions.Normal(actor(obs), log_std.exp())
        log_prob = dist.log_prob(act).sum(-1)
        ratio = (log_prob - old_log_prob).exp()
        policy_loss = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages).mean()
        value_loss = (critic(obs).squeeze(-1) - returns).pow(2).mean()
        loss = policy_loss + 0.5 * value_loss - 0.01 * dist.entropy().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(actor.parameters(), 0.5)
        optimizer.step()

    return step


def make_flow_sampler(steps: int = 20, observations: int = 3, actions: int = 1, batch: int = 64) -> Step:
    """An actor that samples its action by `steps` Euler steps of a velocity net, trained through the sampler."""
    velocity, critic = mlp(observations + actions + 1, actions), mlp(observations + actions, 1)
    for p in critic.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(velocity.parameters(), lr=3e-4)
    obs = torch.randn(batch, observations)

    def step() -> None:
        x = torch.randn(batch, actions)
        for i in range(steps):
            t = torch.full((batch, 1), i / steps)
            x = x + velocity(torch.cat([obs, x, t], dim=-1)) / steps
        loss = -critic(torch.cat([obs, x.tanh()], dim=-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def make_lstm(steps: int = 200, inputs: int = 8, hidden: int = 32, batch: int = 16) -> Step:
    """An LSTM cell unrolled `steps` times, a loss at every step, summed."""
    cell, head = nn.LSTMCell(inputs, hidden), nn.Linear(hidden, 1)
    optimizer = torch.optim.Adam([*cell.parameters(), *head.parameters()], lr=1e-3)
    sequence, targets = torch.randn(steps, batch, inputs), torch.randn(steps, batch, 1)

    def step() -> None:
        h = c = torch.zeros(batch, hidden)
        loss = torch.zeros(())
        for x, target in zip(sequence, targets, strict=True):
            h, c = cell(x, (h, c))
            loss = loss + F.mse_loss(head(h), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def make_wide_graph(nodes: int, tensors: int = 10) -> Step:
    """A graph `nodes` autograd nodes wide and three deep: each node scales one of a few scalar parameters."""
    params = [nn.Parameter(torch.ones(())) for _ in range(tensors)]
    optimizer = torch.optim.SGD(params, lr=1e-3)

    def step() -> None:
        loss = torch.stack([params[i % tensors] * 2.0 for i in range(nodes)]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def make_many_tensors(tensors: int) -> Step:
    """A model of `tensors` small parameter tensors, all in one loss."""
    params = [nn.Parameter(torch.randn(4)) for _ in range(tensors)]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step() -> None:
        loss = torch.cat(params).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def make_many_terms(terms: int, width: int = 64, batch: int = 32) -> Step:
    """A loss that is a sum of `terms` terms, each through the shared MLP on its own input."""
    model = mlp(width, 1, width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs = torch.randn(terms, batch, width)

    def step() -> None:
        loss = model(inputs[0]).pow(2).mean()
        for x in inputs[1:]:
            loss = loss + model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step
