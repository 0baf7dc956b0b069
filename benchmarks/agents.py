"""One update of each reference agent (reference_agents/), on a small data set it collects first."""

from __future__ import annotations

import numpy as np
from workloads import Step

from reference_agents import calf, cpql, distributional_ppo, lapo
from reference_agents.common.cli import seed_everything


def make_cpql() -> Step:
    rng = seed_everything(0)
    config = cpql.Config(dataset_episodes=5)
    data = cpql.collect_dataset(config, rng)
    agent = cpql.CPQLAgent(config)
    return lambda: agent.update(cpql.sample_batch(data, config.batch_size, rng))


def make_lapo() -> Step:
    rng = seed_everything(0)
    config = lapo.LapoConfig(episodes_per_behaviour=1)
    data = lapo.collect_pixel_pendulum(config, rng)
    agent = lapo.Lapo(config, lapo.value_range(data, config.gamma))
    return lambda: agent.update(data.sample(config.batch_size, rng))


def make_distributional_ppo() -> Step:
    seed_everything(0)
    agent = distributional_ppo.DistributionalPPO(distributional_ppo.Config(), 0)
    batch = agent.make_batch(agent.collect_episodes())
    return lambda: agent.update(batch)


def make_calf() -> Step:
    rng = seed_everything(0)
    agent = calf.CalfAgent(calf.CalfConfig(), rng)
    state = np.array([np.pi / 2, 0.0])
    agent.begin_episode(state)
    for _ in range(64):
        start, end = rng.normal(size=2), rng.normal(size=2)
        agent.record(calf.Transition(start, float(rng.normal()), -1.0, end, float(rng.normal())))
    action = agent.propose(state)
    return lambda: agent.update(agent.batch(state, action))


AGENTS = {
    "agent cpql update": make_cpql,
    "agent lapo update": make_lapo,
    "agent distributional_ppo update": make_distributional_ppo,
    "agent calf update": make_calf,
}
