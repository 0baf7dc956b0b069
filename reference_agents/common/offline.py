"""Seeded, in-memory offline data sets: Pendulum-v1 rollouts of scripted behaviour policies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from reference_agents.common.pendulum import MAX_TORQUE, make_pendulum, pendulum_state, set_pendulum_state

BehaviourPolicy = Callable[[float, float, np.random.Generator], float]
"""(theta, theta_dot, rng) -> torque."""


@dataclass
class Transitions:
    """Flat arrays of one-step transitions; `state` is [theta, theta_dot] (theta wrapped, 0 = upright)."""

    state: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_state: np.ndarray
    done: np.ndarray

    def __len__(self) -> int:
        return len(self.reward)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, len(self), size=batch_size)
        return {
            name: torch.as_tensor(getattr(self, name)[idx], dtype=torch.float32)
            for name in ("state", "action", "reward", "next_state", "done")
        }


def collect_pendulum(
    policies: Sequence[BehaviourPolicy], episodes_per_policy: int, steps: int, rng: np.random.Generator
) -> Transitions:
    """Rolls out every behaviour policy from random starts (theta ~ U[-pi, pi], theta_dot ~ U[-1, 1])."""
    env = make_pendulum(int(rng.integers(2**31)))
    columns: dict[str, list] = {k: [] for k in ("state", "action", "reward", "next_state", "done")}
    for policy in policies:
        for _ in range(episodes_per_policy):
            set_pendulum_state(env, rng.uniform(-np.pi, np.pi), rng.uniform(-1, 1))
            for t in range(steps):
                state = pendulum_state(env)
                torque = float(np.clip(policy(state[0], state[1], rng), -MAX_TORQUE, MAX_TORQUE))
                _, reward, _, _, _ = env.step(np.array([torque], dtype=np.float32))
                columns["state"].append(state)
                columns["action"].append([torque])
                columns["reward"].append(reward)
                columns["next_state"].append(pendulum_state(env))
                columns["done"].append(float(t == steps - 1))
    return Transitions(**{k: np.asarray(v, dtype=np.float32) for k, v in columns.items()})
