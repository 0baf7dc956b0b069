"""RiskyChoice-v0 (algorithms.md §1f): five choices between a sure +0.5 and a gamble with a heavy lower tail.

The risky arm pays +1 with probability 0.95 and -4 with probability 0.05: it is better on average
(+0.75 per step) but its episode-return CVaR_0.1 is poor, so a CVaR constraint visibly changes behaviour.
The action is one real number so that a Gaussian policy can play it: a > 0 is risky, a <= 0 is safe.
The observation is the one-hot of the step index t (all zeros once the episode is over).
Every return is a multiple of 0.5 in [-20, 5], so 51 atoms with spacing 0.5 represent returns exactly.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

HORIZON = 5
SAFE_REWARD = 0.5
RISKY_WIN, RISKY_LOSS, LOSS_PROBABILITY = 1.0, -4.0, 0.05
RETURN_SUPPORT = (HORIZON * RISKY_LOSS, HORIZON * RISKY_WIN)
RETURN_SPACING = 0.5
SAFE_ACTION = -1.0
"""What the scripted always-safe expert plays."""


class RiskyChoiceEnv(gym.Env):
    """RiskyChoice-v0; gamma = 1, fixed horizon, terminated after the fifth choice."""

    observation_space = gym.spaces.Box(0.0, 1.0, (HORIZON,), dtype=np.float32)
    action_space = gym.spaces.Box(-np.inf, np.inf, (1,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        return self._observe(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        risky = bool(np.asarray(action).reshape(-1)[0] > 0)
        if risky:
            reward = RISKY_LOSS if self.np_random.random() < LOSS_PROBABILITY else RISKY_WIN
        else:
            reward = SAFE_REWARD
        self._t += 1
        return self._observe(), reward, self._t == HORIZON, False, {"risky": risky}

    def _observe(self) -> np.ndarray:
        obs = np.zeros(HORIZON, dtype=np.float32)
        if self._t < HORIZON:
            obs[self._t] = 1.0
        return obs


def return_atoms() -> np.ndarray:
    """The 51 returns an episode can have, ascending."""
    low, high = RETURN_SUPPORT
    return np.linspace(low, high, round((high - low) / RETURN_SPACING) + 1)


def exact_return_distribution(risk_probabilities: np.ndarray) -> np.ndarray:
    """Probabilities over `return_atoms()` of the episode return when step t is risky w.p. risk_probabilities[t].

    Exact enumeration by convolution: the oracle for the table in algorithms.md §1f and for the
    learned policy's true CVaR (no sampling noise).
    """
    atoms = return_atoms()
    index_of = {value: i for i, value in enumerate(atoms)}
    probs = np.zeros(len(atoms))
    probs[index_of[0.0]] = 1.0
    for q in risk_probabilities:
        step_outcomes = (
            (SAFE_REWARD, 1 - q),
            (RISKY_WIN, q * (1 - LOSS_PROBABILITY)),
            (RISKY_LOSS, q * LOSS_PROBABILITY),
        )
        shifted = np.zeros_like(probs)
        for reward, p in step_outcomes:
            steps = round(reward / RETURN_SPACING)
            shifted += p * np.roll(probs, steps)  # no wrap-around: partial sums stay inside the support
        probs = shifted
    return probs
