"""Unmodified stable-baselines3 trainers under gradaudit: clean as they ship, and one injected bug each reported
with its rule and subject. Run with the `external` extra installed (`.ci/run` does); skipped without it."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch as th
import torch.nn.functional as F

pytest.importorskip(
    "stable_baselines3",
    reason="stable-baselines3 is not installed: `pip install -c constraints.txt -e '.[dev,external]'` "
    "(or `make test EXTRAS=dev,external`) runs the external test group",
)
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3  # noqa: E402
from stable_baselines3.common.base_class import BaseAlgorithm  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.capture import Audit  # noqa: E402
from gradaudit.findings import Severity  # noqa: E402
from gradaudit.trace import Trace  # noqa: E402

pytestmark = pytest.mark.external


def small(algorithm: type[BaseAlgorithm], env: str, **kwargs) -> BaseAlgorithm:
    """A tiny network on a classic-control task, on CPU, seeded (each model gets its own policy_kwargs: SB3
    writes into them)."""
    return algorithm("MlpPolicy", env, seed=0, device="cpu", policy_kwargs={"net_arch": [32, 32]}, **kwargs)


OFF_POLICY = {"learning_starts": 32, "batch_size": 32}
TRAINERS: dict[str, Callable[[], BaseAlgorithm]] = {
    "PPO": lambda: small(PPO, "CartPole-v1", n_steps=64, batch_size=32, n_epochs=2),
    "A2C": lambda: small(A2C, "CartPole-v1", n_steps=8),
    "SAC": lambda: small(SAC, "Pendulum-v1", **OFF_POLICY),
    "TD3": lambda: small(TD3, "Pendulum-v1", **OFF_POLICY),
    "DQN": lambda: small(DQN, "CartPole-v1", train_freq=1, target_update_interval=4, **OFF_POLICY),
}
ITERATIONS = 6
"""Updates audited, as `gradaudit run --iterations 6` would (the window grows until every optimizer stepped)."""


def audited(model: BaseAlgorithm) -> Audit:
    """Trains until the audit window closes (it stops `learn` from inside, as the CLI stops a script)."""
    with gradaudit.audit(iterations=ITERATIONS) as audit:
        model.learn(total_timesteps=100_000)
    assert audit.trace.window.stopped_by == "iterations"
    assert audit.recorder.internal_errors == 0
    return audit


def only_finding(audit: Audit, rule: str):
    serious = [f for f in audit.findings if f.severity >= Severity.warning]
    assert [f.rule for f in serious] == [rule], [(f.rule, f.subject, f.message) for f in serious]
    return serious[0]


def is_module(trace: Trace, group: str, module: th.nn.Module) -> bool:
    """Whether the group holds exactly the module's tensors (trace names carry the path the audited code used to
    reach the module: `self.actor.mu.0.weight` for the actor's `mu.0.weight`)."""
    names = {p.name for p in trace.parameters if p.group == group}
    own = [name for name, _ in module.named_parameters()]
    return len(names) == len(own) and all(any(n == o or n.endswith(f".{o}") for o in own) for n in names)


@pytest.fixture(autouse=True)
def one_thread():
    """Networks of 32 units: threads only contend on a small machine."""
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


@pytest.mark.parametrize("name", TRAINERS)
def test_unmodified_trainer_is_clean(name):
    audit = audited(TRAINERS[name]())
    assert [(f.rule, f.subject, f.message) for f in audit.findings if f.severity >= Severity.warning] == []


def test_td3_actor_loss_with_a_detached_action_leaves_the_actor_untrained():
    model = small(TD3, "Pendulum-v1", **OFF_POLICY)
    q1_forward = model.critic.q1_forward  # used by the actor loss only
    model.critic.q1_forward = lambda obs, actions: q1_forward(obs, actions.detach())
    audit = audited(model)
    finding = only_finding(audit, "GA202")
    assert is_module(audit.trace, finding.subject, model.actor)


class ResidualDQN(DQN):
    """SB3's DQN update with the TD target taken from the online network, outside no_grad."""

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        self.policy.set_training_mode(True)
        for _ in range(gradient_steps):
            data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)
            next_q_values = self.q_net(data.next_observations).max(dim=1).values.reshape(-1, 1)
            target_q_values = data.rewards + (1 - data.dones) * self.gamma * next_q_values
            current_q_values = th.gather(self.q_net(data.observations), dim=1, index=data.actions.long())
            loss = F.smooth_l1_loss(current_q_values, target_q_values)  # residual-gradient
            self.policy.optimizer.zero_grad()
            loss.backward()
            self.policy.optimizer.step()


def test_dqn_with_an_undetached_td_target_is_a_target_grad():
    model = small(ResidualDQN, "CartPole-v1", train_freq=1, **OFF_POLICY)
    audit = audited(model)
    finding = only_finding(audit, "GA206")
    assert finding.subject == "target_q_values"
    assert "`current_q_values` and `target_q_values`" in finding.message
    assert (Path(finding.location.file).name, finding.location.function) == (Path(__file__).name, "train")
    (shared,) = {group for target in audit.trace.regression_targets for group in target.shared_groups}
    assert is_module(audit.trace, shared, model.q_net)


def test_ppo_value_head_left_out_of_the_optimizer_is_an_orphan():
    model = small(PPO, "CartPole-v1", n_steps=64, batch_size=32, n_epochs=2)
    policy = model.policy
    kept = [p for name, p in policy.named_parameters() if not name.startswith("value_net.")]
    policy.optimizer = policy.optimizer_class(kept, lr=model.learning_rate, **policy.optimizer_kwargs)
    audit = audited(model)
    finding = only_finding(audit, "GA201")
    orphans = {p.name for p in audit.trace.parameters if not p.owners}
    assert sorted(name.split(".")[-2:] for name in orphans) == [["value_net", "bias"], ["value_net", "weight"]]
    assert {audit.trace.parameter(name).group for name in orphans} == {finding.subject}


class PenalisedA2C(A2C):
    """SB3's A2C update plus a penalty on the worst returns, computed with numpy: a constant."""

    def train(self) -> None:
        self.policy.set_training_mode(True)
        for rollout_data in self.rollout_buffer.get(batch_size=None):
            actions = rollout_data.actions.long().flatten()
            values, log_prob, _entropy = self.policy.evaluate_actions(rollout_data.observations, actions)
            policy_loss = -(rollout_data.advantages * log_prob).mean()
            value_loss = F.mse_loss(rollout_data.returns, values.flatten())
            worst_returns = th.as_tensor(np.sort(self.rollout_buffer.returns.flatten())[:4].mean())
            loss = policy_loss + self.vf_coef * value_loss + 0.1 * worst_returns
            self.policy.optimizer.zero_grad()
            loss.backward()
            th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()


def test_a2c_penalty_computed_with_numpy_is_a_dead_term():
    audit = audited(small(PenalisedA2C, "CartPole-v1", n_steps=8))
    finding = only_finding(audit, "GA101")
    assert finding.subject == "0.1 * worst_returns"
    assert "th.as_tensor(np.sort(self.rollout_buffer.returns.flatten())[:4].mean())" in finding.message
    assert finding.location.function == "train"
