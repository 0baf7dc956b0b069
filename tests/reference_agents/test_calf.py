"""Seed 004's claims about CALF, measured on the reference agent (algorithms.md section 5g)."""

from __future__ import annotations

import sys
from itertools import islice

import numpy as np
import pytest
import torch

from reference_agents import calf
from reference_agents.calf import (
    CalfAgent,
    CalfConfig,
    StepKind,
    Transition,
    calf_filter,
    in_goal,
    kappa_bounds_hold,
    relax_schedule,
    run_episode,
)
from reference_agents.common.cli import seed_everything
from reference_agents.common.pendulum import (
    MAX_TORQUE,
    expert_torque,
    make_pendulum,
    pendulum_state,
    set_pendulum_state,
)

torch.set_num_threads(1)

PI0_WORST_CASE_STEPS = 172  # algorithms.md 5f: pi_0 enters and stays in G by then, from any start
EPISODE_STEPS = 400
GRID = [(theta, theta_dot) for theta in (-3.0, -1.0, 2.0) for theta_dot in (-2.0, 0.5, 3.0)]


def rollout(policy, start: tuple[float, float], steps: int) -> list[np.ndarray]:
    """States visited by a fixed policy (theta, theta_dot) -> torque, the final one included."""
    env = make_pendulum(0)
    set_pendulum_state(env, *start)
    states = [pendulum_state(env)]
    for _ in range(steps):
        env.step(np.array([policy(*pendulum_state(env))], dtype=np.float32))
        states.append(pendulum_state(env))
    return states


def first_free_step_bound(log: calf.EpisodeLog) -> int:
    """The step from which pi_0 alone acts: one after the last certified or relaxed step."""
    free_steps = [t for t, kind in enumerate(log.kinds) if kind is not StepKind.FALLBACK]
    return free_steps[-1] + 1 if free_steps else 0


@pytest.mark.parametrize("lambda_relax", [0.0, 0.9])
def test_calf_with_a_bad_actor_reaches_the_goal_wherever_pi0_does(lambda_relax: float) -> None:
    pi0_reaches = [in_goal(rollout(expert_torque, start, EPISODE_STEPS)[-1]) for start in GRID]
    bad_actor_reaches = [in_goal(rollout(lambda *_: MAX_TORQUE, start, EPISODE_STEPS)[-1]) for start in GRID]
    assert all(pi0_reaches) and not any(bad_actor_reaches)

    config = CalfConfig(actor="max-torque", lambda_relax=lambda_relax, episode_steps=EPISODE_STEPS)
    agent = CalfAgent(config, seed_everything(0))
    env = make_pendulum(0)
    rows = []
    for start in GRID:
        log = run_episode(agent, env, start, EPISODE_STEPS)
        pi0_alone_from = first_free_step_bound(log)
        goal_by = pi0_alone_from + PI0_WORST_CASE_STEPS
        first_entry = next(t for t, state in enumerate(log.states) if in_goal(state))
        certified, relaxed = log.count(StepKind.CERTIFIED), log.count(StepKind.RELAXED)
        seed_bound = int(-log.initial_certified_value / config.nu_bar) + relaxed + PI0_WORST_CASE_STEPS
        rows.append((start, certified, relaxed, pi0_alone_from, first_entry, seed_bound))
        assert goal_by < EPISODE_STEPS, f"{start}: actor still acting at step {pi0_alone_from - 1}"
        assert all(in_goal(state) for state in log.states[goal_by:]), f"{start}: left G under pi_0 alone"
        assert log.reached_goal
        if lambda_relax == 0.0:
            assert relaxed == 0

    print(f"\nlambda_relax={lambda_relax}: start, certified, relaxed, pi_0 alone from, first in G, N_cert+R+172")
    for row in rows:
        print("  ", *row)
    relax_counts = np.array([row[2] for row in rows])
    print(f"   mean relax events {relax_counts.mean():.2f} (bound 1/(1-lambda) = {1 / (1 - lambda_relax):.2f})")
    standard_error = relax_counts.std(ddof=1) / np.sqrt(len(relax_counts))
    assert relax_counts.mean() <= 1 / (1 - lambda_relax) + 3 * standard_error


@pytest.mark.parametrize("lambda_relax", [0.0, 0.5, 0.9])
def test_relax_events_respect_the_geometric_bound(lambda_relax: float) -> None:
    """Worst case for the filter: never certified. E[sum xi] = lambda / (1 - lambda) <= 1 / (1 - lambda)."""
    rng = np.random.default_rng(0)
    episodes, steps = 2000, 100
    counts = np.array(
        [
            sum(
                calf_filter(False, p, rng.uniform()) is StepKind.RELAXED
                for p in islice(relax_schedule(lambda_relax), steps)
            )
            for _ in range(episodes)
        ]
    )
    mean, standard_error = counts.mean(), counts.std(ddof=1) / np.sqrt(episodes)
    bound = 1 / (1 - lambda_relax)
    print(f"\nlambda={lambda_relax}: mean relax events {mean:.3f} +- {standard_error:.3f}, bound {bound:.3f}")
    assert mean <= bound + 3 * standard_error
    assert abs(mean - lambda_relax / (1 - lambda_relax)) <= 4 * standard_error + 1e-12
    if lambda_relax == 0.0:
        assert counts.max() == 0


def test_certified_steps_satisfy_the_certificate_and_the_triple_changes_only_then() -> None:
    config = CalfConfig(actor="uniform", lambda_relax=0.9)
    agent = CalfAgent(config, seed_everything(3))
    env = make_pendulum(0)
    certified_per_episode, bounds, increments = [], [], []
    live_differs_from_certified = False
    for start in [(3.0, 0.0), (-2.5, 1.0), (2.0, -1.0)]:
        set_pendulum_state(env, *start)
        state = pendulum_state(env)
        action = agent.begin_episode(state)
        bounds.append(-agent.certified.value / config.nu_bar)
        certified_steps = 0
        for _ in range(250):
            _, reward, _, _, _ = env.step(np.array([action], dtype=np.float32))
            next_state = pendulum_state(env)
            before = agent.certified
            weights_before = before.critic.weight.clone()
            next_action, kind = agent.act(next_state)
            after = agent.certified
            assert torch.equal(before.critic.weight, weights_before), "w+ moved with the live critic"
            assert after.critic.weight.data_ptr() != agent.critic.weight.data_ptr()
            assert not after.critic.weight.requires_grad
            if kind is StepKind.CERTIFIED:
                certified_steps += 1
                with torch.no_grad():
                    value = after.critic(after.state, after.action)
                assert float(value) == after.value
                assert after.value - before.value >= config.nu_bar
                assert bool(kappa_bounds_hold(config, after.state, value))
                increments.append(after.value - before.value)
            else:
                assert after is before and torch.equal(after.critic.weight, weights_before)
                live_differs_from_certified |= not torch.equal(agent.critic.weight, after.critic.weight)
            agent.record(Transition(state, action, float(reward), next_state, next_action))
            state, action = next_state, next_action
        certified_per_episode.append(certified_steps)

    print(f"\ncertified steps per episode {certified_per_episode}, bounds -q+_0/nu_bar {np.round(bounds, 1)}")
    print(f"smallest certified increase {min(increments):.3f} (nu_bar {config.nu_bar})")
    assert all(n <= bound for n, bound in zip(certified_per_episode, bounds))
    assert sum(certified_per_episode) > 0 and live_differs_from_certified


def violating_batch(agent: CalfAgent) -> dict[str, torch.Tensor]:
    """Two transitions near the bottom, and a probe (s_t, a_t) that breaks the decrease condition."""
    state = np.array([3.0, 0.5])
    agent.begin_episode(np.array([0.5, 0.0]))
    for _ in range(2):
        agent.record(Transition(state, 1.0, -9.0, state + 0.01, -1.0))
    return agent.batch(state, 1.5)


def test_constraint_penalty_reaches_the_critic_only_in_the_fixed_variant() -> None:
    lr = CalfConfig().critic_lr
    deltas, penalties = {}, {}
    for variant in calf.VARIANTS:
        torch.manual_seed(0)
        agent = CalfAgent(CalfConfig(variant=variant, actor="max-torque"), np.random.default_rng(0))
        batch = violating_batch(agent)
        penalty = agent.constraint_penalty(batch["probe_state"], batch["probe_action"])
        penalty_value = float(penalty.detach())
        penalties[variant] = (penalty_value, penalty.requires_grad)
        if variant == "fixed":
            (penalty_grad,) = torch.autograd.grad(penalty, agent.critic.weight)
        before = agent.critic.weight.detach().clone()
        metrics = agent.update(batch)
        assert float(metrics["constraint_penalty"]) == pytest.approx(penalty_value)
        deltas[variant] = agent.critic.weight.detach() - before

    print(f"\npenalty (value, requires_grad) per variant: {penalties}")
    print(f"penalty gradient on w: {penalty_grad.numpy().round(3)}")
    assert penalties["fixed"][1] and not penalties["constraint-nograd"][1]
    assert penalties["fixed"][0] == pytest.approx(penalties["constraint-nograd"][0]) and penalties["fixed"][0] > 0
    assert penalty_grad.norm() > 0
    torch.testing.assert_close(deltas["fixed"] - deltas["constraint-nograd"], -lr * penalty_grad)


def test_optimizers_own_the_live_networks_and_nothing_else() -> None:
    torch.manual_seed(0)
    agent = CalfAgent(CalfConfig(actor="learned"), np.random.default_rng(0))
    batch = violating_batch(agent)
    critic_owned, actor_owned = (
        {id(p) for group in opt.param_groups for p in group["params"]} for opt in (agent.critic_opt, agent.actor_opt)
    )
    assert critic_owned == {id(agent.critic.weight)}
    assert actor_owned == {id(p) for p in agent.actor.parameters()}
    frozen = [agent.certified.critic.weight, agent.initial_critic.weight]
    assert not any(p.requires_grad for p in frozen)
    certified_before = agent.certified.critic.weight.clone()
    actor_before = [p.detach().clone() for p in agent.actor.parameters()]
    agent.update(batch)
    assert torch.equal(agent.certified.critic.weight, certified_before)
    assert all(not torch.equal(p, q) for p, q in zip(agent.actor.parameters(), actor_before))


def test_training_is_deterministic_per_seed() -> None:
    def run() -> list[tuple]:
        logs = calf.train(CalfConfig(steps=60, episode_steps=30, seed=5), quiet=True)
        return [(log.kinds, log.cost) for log in logs]

    assert run() == run()


def test_cli_help_and_short_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["calf", "--help"])
    with pytest.raises(SystemExit):
        calf.main()
    help_text = capsys.readouterr().out
    assert all(variant in help_text for variant in calf.VARIANTS) and "seed 004" in help_text
    monkeypatch.setattr(sys, "argv", ["calf", "--steps", "40", "--episode-steps", "20", "--quiet"])
    calf.main()
    assert "CALF episodes" in capsys.readouterr().out
