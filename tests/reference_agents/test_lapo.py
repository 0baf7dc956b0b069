"""Multimodal LAPO (seed 002): who owns the observation encoder, and what each optimizer step does to it."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from reference_agents.common.cli import seed_everything
from reference_agents.lapo import (
    VARIANTS,
    Lapo,
    LapoConfig,
    PixelTransitions,
    collect_pixel_pendulum,
    train,
    value_range,
)

SMALL = LapoConfig(episodes_per_behaviour=2, batch_size=32, feature_dim=16, hidden=(32, 32), eval_episodes=1)


@pytest.fixture(autouse=True)
def float64_single_thread() -> Iterator[None]:
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="module")
def data() -> PixelTransitions:
    return collect_pixel_pendulum(SMALL, np.random.default_rng(0))


def make_agent(data: PixelTransitions, variant: str, seed: int = 0) -> Lapo:
    torch.manual_seed(seed)
    return Lapo(replace(SMALL, variant=variant), value_range(data, SMALL.gamma))


def batch_of(data: PixelTransitions, seed: int = 1) -> dict[str, Tensor]:
    return data.sample(SMALL.batch_size, np.random.default_rng(seed))


def param_ids(*modules: nn.Module) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def owned_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def snapshot(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def max_change(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


class EncoderWatch:
    """Snapshots the encoder after each optimizer step and notes in which phase each encoder gradient arrived."""

    PHASES = ("critic", "actor_vae", "actor", "polyak")

    def __init__(self, agent: Lapo):
        self.agent = agent
        self.phase = "critic"
        self.after_step = {"start": snapshot(agent.obs_encoder)}
        self.gradient_phases: list[str] = []
        optimizers = (agent.critic_optimizer, agent.actor_vae_optimizer, agent.actor_optimizer)
        for name, following, optimizer in zip(self.PHASES, self.PHASES[1:], optimizers):
            optimizer.register_step_post_hook(self._finish(name, following))
        for p in agent.obs_encoder.parameters():
            p.register_post_accumulate_grad_hook(lambda _: self.gradient_phases.append(self.phase))

    def _finish(self, name: str, following: str):
        def hook(*_) -> None:
            self.after_step[name] = snapshot(self.agent.obs_encoder)
            self.phase = following

        return hook


# ---------------------------------------------------------------------------------------------------------
# Optimizer layout
# ---------------------------------------------------------------------------------------------------------


EXPECTED_ENCODER_OWNERS = {"fixed": ["critic"], "encoder-in-actor": ["actor_vae"], "encoder-orphan": []}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_optimizer_membership(data: PixelTransitions, variant: str) -> None:
    agent = make_agent(data, variant)
    critic, vae, actor = (
        owned_ids(o) for o in (agent.critic_optimizer, agent.actor_vae_optimizer, agent.actor_optimizer)
    )
    encoder = param_ids(agent.obs_encoder)
    owners = [name for name, ids in (("critic", critic), ("actor_vae", vae), ("actor", actor)) if encoder & ids]
    assert owners == EXPECTED_ENCODER_OWNERS[variant]
    assert all(encoder <= ids for name, ids in (("critic", critic), ("actor_vae", vae)) if name in owners)
    assert critic & vae == set() and critic & actor == set() and vae & actor == set()
    assert param_ids(agent.critic) <= critic and param_ids(agent.actor_vae) <= vae
    assert param_ids(agent.actor) == actor
    targets = (agent.critic_target, agent.actor_target, agent.actor_vae_target, agent.obs_encoder_target)
    assert not param_ids(*targets) & (critic | vae | actor)
    assert not any(p.requires_grad for t in targets for p in t.parameters())


# ---------------------------------------------------------------------------------------------------------
# Seed 002: which step moves the encoder
# ---------------------------------------------------------------------------------------------------------

# After (critic step, actor-VAE step, actor step): does the encoder move?
EXPECTED_MOVES = {
    "fixed": (True, False, False),
    "encoder-in-actor": (False, True, False),
    "encoder-orphan": (False, False, False),
}
EXPECTED_GRADIENT_PHASES = {
    "fixed": {"critic"},
    "encoder-in-actor": {"critic", "actor_vae"},
    "encoder-orphan": {"critic"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_moves_only_in_the_step_of_its_owner(data: PixelTransitions, variant: str) -> None:
    agent = make_agent(data, variant)
    watch = EncoderWatch(agent)
    agent.update(batch_of(data))
    steps = ("start", "critic", "actor_vae", "actor")
    moves = tuple(not same(watch.after_step[a], watch.after_step[b]) for a, b in zip(steps, steps[1:]))
    changes = [max_change(watch.after_step[a], watch.after_step[b]) for a, b in zip(steps, steps[1:])]
    print(f"{variant}: encoder max change per step (critic, actor-VAE, actor) = {changes}")
    assert moves == EXPECTED_MOVES[variant]
    assert set(watch.gradient_phases) == EXPECTED_GRADIENT_PHASES[variant]


def test_orphan_encoder_keeps_gradient_nothing_applies(data: PixelTransitions) -> None:
    agent = make_agent(data, "encoder-orphan")
    before = snapshot(agent.obs_encoder)
    agent.update(batch_of(data, seed=1))
    first = [p.grad.clone() for p in agent.obs_encoder.parameters()]
    agent.update(batch_of(data, seed=2))
    grad_norm = sum(p.grad.norm() ** 2 for p in agent.obs_encoder.parameters()) ** 0.5
    print(f"encoder-orphan: accumulated encoder grad norm after 2 updates = {grad_norm:.3e}")
    assert grad_norm > 0 and same(before, snapshot(agent.obs_encoder))
    # No optimizer's zero_grad covers the encoder, so the second critic gradient piles onto the first.
    assert not same(first, [p.grad for p in agent.obs_encoder.parameters()])


def run_with_critic_gradient_to_encoder(agent: Lapo, batch: dict[str, Tensor], blocked: bool) -> list[Tensor]:
    """One update from a fixed RNG state; `blocked` zeroes every encoder gradient the critic backward produces."""
    state = {"critic_phase": True}
    agent.critic_optimizer.register_step_post_hook(lambda *_: state.update(critic_phase=False))
    for p in agent.obs_encoder.parameters():
        p.register_hook(lambda g: torch.zeros_like(g) if blocked and state["critic_phase"] else g)
    torch.manual_seed(123)
    agent.update(batch)
    return snapshot(agent.obs_encoder)


@pytest.mark.parametrize("variant", ["fixed", "encoder-in-actor"])
def test_critic_gradient_to_encoder_reaches_a_step_only_when_fixed(data: PixelTransitions, variant: str) -> None:
    agent, batch = make_agent(data, variant), batch_of(data)
    before = snapshot(agent.obs_encoder)
    with_critic = run_with_critic_gradient_to_encoder(copy.deepcopy(agent), batch, blocked=False)
    without_critic = run_with_critic_gradient_to_encoder(copy.deepcopy(agent), batch, blocked=True)
    print(
        f"{variant}: encoder change with the critic gradient {max_change(before, with_critic):.3e}, "
        f"without it {max_change(before, without_critic):.3e}, "
        f"difference {max_change(with_critic, without_critic):.3e}"
    )
    if variant == "fixed":
        assert same(before, without_critic) and not same(before, with_critic)
    else:
        # The bug: the critic's gradient is wiped before any step, so the encoder moves by the VAE gradient alone.
        assert same(with_critic, without_critic) and not same(before, with_critic)


# ---------------------------------------------------------------------------------------------------------
# Targets, Polyak, advantage weights
# ---------------------------------------------------------------------------------------------------------


def test_targets_carry_no_gradient(data: PixelTransitions) -> None:
    agent, batch = make_agent(data, "fixed"), batch_of(data)
    features = agent.obs_encoder(batch["image"], batch["velocity"])
    assert features.requires_grad
    y_q, y_v = agent.value_targets(batch, features)
    advantage, weights = agent.advantage_weights(batch, features)
    assert not any(t.requires_grad for t in (y_q, y_v, advantage, weights))
    assert y_v.min() >= agent.v_min and y_v.max() <= agent.v_max
    agent.update(batch)
    targets = (agent.critic_target, agent.actor_target, agent.actor_vae_target, agent.obs_encoder_target)
    assert all(p.grad is None for t in targets for p in t.parameters())


def test_target_networks_change_only_by_polyak(data: PixelTransitions) -> None:
    agent = make_agent(data, "fixed")
    pairs = {
        "critic": (agent.critic_target, agent.critic),
        "actor": (agent.actor_target, agent.actor),
        "actor_vae": (agent.actor_vae_target, agent.actor_vae),
        "obs_encoder": (agent.obs_encoder_target, agent.obs_encoder),
    }
    agent.update(batch_of(data, seed=1))  # make online and target differ before the checked update
    old_targets = {name: snapshot(target) for name, (target, _) in pairs.items()}
    agent.update(batch_of(data, seed=2))
    tau = agent.cfg.tau
    for name, (target, online) in pairs.items():
        for old, new, theta in zip(old_targets[name], target.parameters(), online.parameters()):
            torch.testing.assert_close(new, tau * theta + (1 - tau) * old, rtol=0, atol=1e-14, msg=name)
        assert not same(old_targets[name], snapshot(target)), f"{name} target did not move"


def test_omega_weight_fraction_equals_positive_advantage_fraction(data: PixelTransitions) -> None:
    agent, batch = make_agent(data, "fixed"), data.batch(slice(None))
    features = agent.obs_encoder(batch["image"], batch["velocity"])
    advantage, _ = agent.advantage_weights(batch, features)
    with torch.no_grad():  # an untrained V is ~0 > every return: shift it so about half the advantages are positive
        agent.critic.v_net[-1].bias += advantage.median()
    advantage, weights = agent.advantage_weights(batch, features)
    omega = agent.cfg.expectile
    positive, weighted = (advantage > 0).double().mean().item(), (weights == omega).double().mean().item()
    print(f"fraction A > 0 = {positive:.4f}, fraction w = omega = {weighted:.4f} over {len(advantage)} samples")
    assert 0.4 < positive < 0.6 and positive == weighted
    assert torch.all((weights == omega) | (weights == 1 - omega))
    metrics = agent.update(batch_of(data))
    assert metrics["advantage_positive_fraction"] == metrics["weight_omega_fraction"]


# ---------------------------------------------------------------------------------------------------------
# Behaviour (soft) and command line
# ---------------------------------------------------------------------------------------------------------


def held_out_td_error(variant: str, seed: int, steps: int = 150) -> float:
    cfg = LapoConfig(variant=variant, episodes_per_behaviour=3, batch_size=64, feature_dim=32, hidden=(64, 64))
    rng = seed_everything(seed)
    data = collect_pixel_pendulum(cfg, rng)
    held_out = collect_pixel_pendulum(replace(cfg, episodes_per_behaviour=2), rng, like=data)
    agent = Lapo(cfg, value_range(data, cfg.gamma))
    for _ in range(steps):
        agent.update(data.sample(cfg.batch_size, rng))
    return agent.td_error(held_out.batch(slice(None)))


def test_fixed_encoder_layout_lowers_held_out_td_error() -> None:
    torch.set_default_dtype(torch.float32)  # a training run, as on the command line; float64 only slows it
    errors = {v: [held_out_td_error(v, seed) for seed in range(3)] for v in ("fixed", "encoder-in-actor")}
    print(f"held-out TD error after 150 iterations, seeds 0-2: {errors}")
    assert all(f < b for f, b in zip(errors["fixed"], errors["encoder-in-actor"]))
    assert np.mean(errors["fixed"]) < 0.5 * np.mean(errors["encoder-in-actor"])


def test_train_is_deterministic_for_a_seed() -> None:
    torch.set_default_dtype(torch.float32)
    first, second = (train(SMALL, steps=5, seed=7, quiet=True) for _ in range(2))
    assert first == second
    assert first["held_out_td_error"] > 0 and first["policy_return"] < 0


def test_cli_help_lists_variants_with_their_seed() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "reference_agents.lapo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for variant in VARIANTS:
        assert variant in out
    assert out.count("seed 002") >= len(VARIANTS)


def test_cli_runs_a_few_steps() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reference_agents.lapo", "--variant", "encoder-in-actor", "--steps", "3", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "held_out_td_error" in result.stdout
