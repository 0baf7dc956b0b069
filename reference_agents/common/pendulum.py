"""Pendulum-v1 helpers: state access, the nominal energy/PD expert pi_0, a rod renderer, offline data.

The expert is the regelum-calf preset for gym's Pendulum-v1 (energy swing-up, k=0.6, switching to
PD with Kp=12, Kd=4 once cos(theta) > cos(pi/10) and |theta_dot| <= 0.2, torque clipped to +-2).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

MAX_TORQUE = 2.0
G, M, L = 10.0, 1.0, 1.0


def make_pendulum(seed: int) -> gym.Env:
    env = gym.make("Pendulum-v1")
    env.reset(seed=seed)
    return env


def pendulum_state(env: gym.Env) -> np.ndarray:
    """[theta, theta_dot] with theta wrapped to [-pi, pi), 0 = upright."""
    theta, theta_dot = env.unwrapped.state
    return np.array([angle_normalize(theta), theta_dot], dtype=np.float64)


def set_pendulum_state(env: gym.Env, theta: float, theta_dot: float) -> np.ndarray:
    env.unwrapped.state = np.array([theta, theta_dot], dtype=np.float64)
    return env.unwrapped._get_obs()


def angle_normalize(x: np.ndarray | float) -> np.ndarray | float:
    return ((x + np.pi) % (2 * np.pi)) - np.pi


def expert_torque(theta: float, theta_dot: float, k: float = 0.6, kp: float = 12.0, kd: float = 4.0) -> float:
    """pi_0: energy pumping far from upright, PD near it."""
    theta = float(angle_normalize(theta))
    if np.cos(theta) > np.cos(np.pi / 10) and abs(theta_dot) <= 0.2:
        u = -kp * np.sin(theta) - kd * theta_dot
    else:
        energy = M * G * L * (np.cos(theta) - 1) / 2 + 0.5 * (M * L**2 / 3) * theta_dot**2
        u = -k * np.sign(theta_dot * energy)
    return float(np.clip(u, -MAX_TORQUE, MAX_TORQUE))


def render_rod(theta: np.ndarray, size: int = 16) -> np.ndarray:
    """A (N, 1, size, size) float32 image of the rod for each angle: the angle is visible only here."""
    theta = np.atleast_1d(theta)
    coords = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    xs, ys = np.meshgrid(coords, -coords)
    tips = np.stack([np.sin(theta), np.cos(theta)], axis=-1) * 0.9  # upright = tip at the top
    t = np.clip((xs[None] * tips[:, None, None, 0] + ys[None] * tips[:, None, None, 1]) / 0.81, 0, 1)
    dist = np.hypot(xs[None] - t * tips[:, None, None, 0], ys[None] - t * tips[:, None, None, 1])
    return (dist < 0.12).astype(np.float32)[:, None]
