"""CPQL with a flow-matching policy: offline Q-learning on Pendulum-v1 (seed 003, algorithms.md §4).

Algorithm (Chen, Li, Zhao, "Boosting Continuous Control with Consistency Policy", AAMAS 2024, with the
seed's flow-matching actor in place of the consistency model):

- Policy: a velocity field v_phi(x, t, s). An action is sampled with N Euler steps
  x_{i+1} = x_i + v_phi(x_i, i/N, s) / N from x_0 ~ N(0, I), and a = clip(x_N, -1, 1) in normalised
  torque units (torque = 2a).
- Critic: twin Q-networks (LayerNorm, as CPQL does offline) with a Polyak target copy.
  y = r + gamma (1 - d) min(Q1', Q2')(s', a'), with a' sampled from the online policy, all under no_grad.
  L_critic = MSE(Q1, y) + MSE(Q2, y) [+ cql_weight * CQL(H) penalty with uniform random actions].
- Actor: L_actor = bc_weight * L_fm + alpha * L_q, where
  L_fm = ||v_phi(x_t, t, s) - (a - x_0)||^2 with t ~ U[0, 1], x_t = (1 - t) x_0 + t a (rectified flow), and
  L_q = -mean min(Q1, Q2)(s, pi(s)) (the seed), or with `q_norm` CPQL's
  -mean Q_i(s, pi(s)) / sg(mean |Q_j(s, pi(s))|), i chosen at random, j != i.
  Naming clash: `alpha` is the seed's name for the Q weight; in CPQL `alpha` weighs BC and `eta` weighs Q.
- `q_grad_mode` decides how many of the N Euler steps carry the Q gradient into phi: the first N - k run
  under no_grad, the last k keep the graph (k = 1, 5, N for single_step, last_5, whole_grad). The sampled
  action is the same for every k; only the gradient differs.

Variants are the seed's `q_grad_mode` values (seed 003, its LiftPegUpright-v1 experiments); every other
setting is an ordinary flag (`--q-norm`, `--cql-weight`, `--grad-clip`, `--alpha`):
- `single_step` (default): the seed's recommendation, alpha = 0.01, grad-norm clipping 1.0.
- `last_5`: the Q-gradient runs back through the last 5 Euler steps.
- `whole_grad`: the seed's bug, the Q-gradient runs back through all 10 Euler steps (the Jacobian products
  prod(I + dv/dx / N) of algorithms.md §4c); the seed saw q_mean grow fastest here.
`--q-norm` gives original CPQL's normalised Q-loss (use it with `--alpha 1`, CPQL's eta is of that order);
`--cql-weight` adds the conservative penalty the seed suggests, on the critic loss only.

The per-update metrics include `q_mean` (mean min-Q on the policy's actions), `critic_loss` and
`q_grad_norm` = ||d L_q / d phi|| (unweighted by alpha, measured with autograd.grad before the backward).

Expected gradient-flow facts (the oracle for the audit of the `single_step` variant):
- `actor_optimizer` owns exactly `velocity_net`; `critic_optimizer` owns exactly `critic` (q1, q2).
  `critic_target` belongs to no optimizer, has requires_grad off, and changes only by Polyak averaging.
- The TD target (next-action sampling included) and the CQL random actions are built under no_grad: the
  critic step leaves `velocity_net` untouched.
- The Q-loss reaches `velocity_net` through exactly the last k Euler steps; the no_grad prefix makes
  x_{N-k} a constant. Both actor-loss terms (BC and Q) reach `velocity_net`.
- The actor loss is evaluated through `critic`, so its backward fills `critic`'s .grad; `critic_optimizer`
  never steps on it: its zero_grad, before the next critic backward, wipes it (normal downstream evaluator).
- `q_grad_norm` is taken with torch.autograd.grad(retain_graph=True), which fills no .grad; the single
  actor_loss.backward() that follows is what the step applies.
- The denominator |Q_j| of the normalised Q-loss is detached.
- Gradient-norm clipping applies to `velocity_net` only, after the actor backward and before its step; the
  recorded `actor_grad_norm` is the norm before clipping.
- The CQL penalty is part of the critic loss only.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, fields, replace

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_agents.common.cli import agent_parser, seed_everything
from reference_agents.common.nets import polyak_update
from reference_agents.common.offline import Transitions, collect_pendulum
from reference_agents.common.pendulum import MAX_TORQUE, expert_torque
from reference_agents.common.progress import print_metrics, training_progress

OBS_DIM, ACTION_DIM = 3, 1

Q_GRAD_STEPS = {"single_step": 1, "last_5": 5, "whole_grad": None}
"""How many trailing Euler steps carry the Q gradient; None = all of them."""


@dataclass
class Config:
    alpha: float = 0.01
    """Weight of the Q-loss in the actor loss (the seed's name; CPQL calls it eta)."""
    bc_weight: float = 1.0
    """Weight of the flow-matching BC loss (CPQL's alpha)."""
    q_grad_mode: str = "single_step"
    """Which Euler steps carry the Q gradient: single_step, last_5 or whole_grad."""
    q_norm: bool = False
    """Use CPQL's -Q_i.mean() / |Q_j|.mean().detach() with random i instead of -min(Q1, Q2).mean()."""
    grad_clip: float | None = 1.0
    """Max gradient norm on velocity_net; None disables clipping."""
    cql_weight: float = 0.0
    """Weight of the CQL(H) penalty on the critic loss; 0 disables it."""
    cql_random_actions: int = 10
    """Uniform random actions per state in the CQL logsumexp."""
    num_flow_steps: int = 10
    """Euler steps of the sampler."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of velocity_net and of each Q-network."""
    actor_lr: float = 3e-4
    """Adam learning rate of velocity_net."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critic."""
    gamma: float = 0.99
    """Discount."""
    tau: float = 0.005
    """Polyak rate of the target critic, applied after every update."""
    batch_size: int = 256
    """Transitions per update."""
    dataset_episodes: int = 100
    """Offline episodes of 200 steps; 20% of them uniform-random, the rest the noisy expert."""
    expert_noise: float = 0.3
    """Std of the Gaussian torque noise added to the expert pi_0."""
    eval_episodes: int = 10
    """Episodes of the final evaluation."""


VARIANTS = {
    "single_step": "seed 003 recommendation: Q-gradient through the last Euler step only",
    "last_5": "seed 003: Q-gradient through the last 5 of 10 Euler steps",
    "whole_grad": "seed 003 bug: Q-gradient back through all 10 Euler steps",
}
VARIANT_CONFIGS = {name: Config(q_grad_mode=name) for name in VARIANTS}


# ---------------------------------------------------------------------------------------------- data


def pendulum_obs(state: Tensor) -> Tensor:
    """[theta, theta_dot] -> Pendulum-v1's observation [cos theta, sin theta, theta_dot]."""
    theta, theta_dot = state.unbind(-1)
    return torch.stack([theta.cos(), theta.sin(), theta_dot], dim=-1)


def collect_dataset(config: Config, rng: np.random.Generator) -> Transitions:
    """Noisy expert pi_0 (80% of episodes) and uniform-random torques (20%), as in algorithms.md §4f."""

    def noisy_expert(theta: float, theta_dot: float, rng: np.random.Generator) -> float:
        return expert_torque(theta, theta_dot) + rng.normal(0.0, config.expert_noise)

    def uniform_random(theta: float, theta_dot: float, rng: np.random.Generator) -> float:
        return rng.uniform(-MAX_TORQUE, MAX_TORQUE)

    behaviour = (noisy_expert,) * 4 + (uniform_random,)
    return collect_pendulum(behaviour, config.dataset_episodes // len(behaviour), 200, rng)


def sample_batch(data: Transitions, batch_size: int, rng: np.random.Generator) -> dict[str, Tensor]:
    """A batch in the agent's units: observations, and actions normalised to [-1, 1]."""
    raw = data.sample(batch_size, rng)
    return {
        "obs": pendulum_obs(raw["state"]),
        "action": raw["action"] / MAX_TORQUE,
        "reward": raw["reward"],
        "next_obs": pendulum_obs(raw["next_state"]),
        "done": raw["done"],
    }


def success_once(theta: np.ndarray, theta_dot: np.ndarray) -> np.ndarray:
    """Per episode (rows): did it ever enter |theta| < 0.1 and |theta_dot| < 0.5?"""
    return ((np.abs(theta) < 0.1) & (np.abs(theta_dot) < 0.5)).any(axis=-1)


def dataset_success_rate(data: Transitions, steps_per_episode: int = 200) -> float:
    episodes = data.state.reshape(-1, steps_per_episode, 2)
    return float(success_once(episodes[..., 0], episodes[..., 1]).mean())


# ------------------------------------------------------------------------------------------ networks


def layer_norm_mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """Linear -> LayerNorm -> SiLU blocks: CPQL's offline critic, with SiLU for Mish (9x faster on CPU)."""
    layers: list[nn.Module] = []
    dims = (in_dim, *hidden)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.SiLU()]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


class VelocityNet(nn.Module):
    """v_phi(x, t, s): the flow's velocity at point x, time t in [0, 1], conditioned on observation s."""

    def __init__(self, hidden: tuple[int, ...]):
        super().__init__()
        dims = (ACTION_DIM + 1 + OBS_DIM, *hidden)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.SiLU()]
        layers.append(nn.Linear(dims[-1], ACTION_DIM))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        return self.net(torch.cat([x, t, obs], dim=-1))


class TwinCritic(nn.Module):
    """Q1 and Q2 on (s, a); each returns shape (batch,)."""

    def __init__(self, hidden: tuple[int, ...]):
        super().__init__()
        self.q1 = layer_norm_mlp(OBS_DIM + ACTION_DIM, 1, hidden)
        self.q2 = layer_norm_mlp(OBS_DIM + ACTION_DIM, 1, hidden)

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        obs_action = torch.cat([obs, action], dim=-1)
        return self.q1(obs_action).squeeze(-1), self.q2(obs_action).squeeze(-1)


def flow_sample(velocity_net: VelocityNet, obs: Tensor, x0: Tensor, num_steps: int, grad_steps: int) -> Tensor:
    """Euler-integrates the flow from x0; only the last `grad_steps` steps build an autograd graph."""
    x = x0
    for i in range(num_steps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= num_steps - grad_steps):
            t = torch.full_like(x[..., :1], i / num_steps)
            x = x + velocity_net(x, t, obs) / num_steps
    return x.clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------- the agent


class CPQLAgent:
    def __init__(self, config: Config):
        self.config = config
        self.velocity_net = VelocityNet(config.hidden)
        self.critic = TwinCritic(config.hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(self.velocity_net.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.q_grad_steps = Q_GRAD_STEPS[config.q_grad_mode] or config.num_flow_steps

    def act(self, obs: Tensor, grad_steps: int = 0) -> Tensor:
        """pi(s): normalised actions in [-1, 1]; the Q gradient flows through the last `grad_steps` steps."""
        x0 = torch.randn(*obs.shape[:-1], ACTION_DIM, dtype=obs.dtype)
        return flow_sample(self.velocity_net, obs, x0, self.config.num_flow_steps, grad_steps)

    # ---- losses -------------------------------------------------------------------------------------

    def critic_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        obs, action = batch["obs"], batch["action"]
        with torch.no_grad():
            next_action = self.act(batch["next_obs"])
            next_q = torch.min(*self.critic_target(batch["next_obs"], next_action))
            td_target = batch["reward"] + self.config.gamma * (1.0 - batch["done"]) * next_q
        q1, q2 = self.critic(obs, action)
        loss = F.mse_loss(q1, td_target) + F.mse_loss(q2, td_target)
        metrics = {"critic_loss": loss.detach(), "q_data_mean": q1.detach().mean()}
        if self.config.cql_weight > 0:
            penalty = self.cql_penalty(obs, q1, q2)
            loss = loss + self.config.cql_weight * penalty
            metrics["cql_penalty"] = penalty.detach()
        return loss, metrics

    def cql_penalty(self, obs: Tensor, q1_data: Tensor, q2_data: Tensor) -> Tensor:
        """CQL(H): mean_s logsumexp_j Q(s, a_j) - mean_D Q(s, a), a_j ~ U[-1, 1] (no policy log-density)."""
        n = self.config.cql_random_actions
        with torch.no_grad():
            random_actions = torch.rand(n, *obs.shape[:-1], ACTION_DIM, dtype=obs.dtype) * 2 - 1
        q1_random, q2_random = self.critic(obs.expand(n, *obs.shape), random_actions)
        return sum(
            torch.logsumexp(q_random, dim=0).mean() - q_data.mean()
            for q_random, q_data in ((q1_random, q1_data), (q2_random, q2_data))
        )

    def flow_matching_loss(self, obs: Tensor, action: Tensor) -> Tensor:
        """Rectified-flow BC: regress v_phi(x_t, t, s) on the straight-line velocity a - x_0."""
        x0 = torch.randn_like(action)
        t = torch.rand_like(action[..., :1])
        x_t = (1 - t) * x0 + t * action
        return (self.velocity_net(x_t, t, obs) - (action - x0)).pow(2).sum(-1).mean()

    def q_loss(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """(L_q, mean Q on the policy's actions); the graph runs through the last k Euler steps."""
        q1, q2 = self.critic(obs, self.act(obs, grad_steps=self.q_grad_steps))
        if self.config.q_norm:
            if torch.rand(()) < 0.5:
                q1, q2 = q2, q1
            loss = -q1.mean() / q2.abs().mean().detach()
        else:
            loss = -torch.min(q1, q2).mean()
        return loss, torch.min(q1, q2).detach().mean()

    # ---- one update ---------------------------------------------------------------------------------

    def critic_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        loss, metrics = self.critic_loss(batch)
        self.critic_optimizer.zero_grad()
        loss.backward()
        self.critic_optimizer.step()
        return metrics

    def actor_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        bc_loss = self.flow_matching_loss(batch["obs"], batch["action"])
        q_loss, q_policy_mean = self.q_loss(batch["obs"])
        actor_loss = self.config.bc_weight * bc_loss + self.config.alpha * q_loss
        params = list(self.velocity_net.parameters())
        q_grads = torch.autograd.grad(q_loss, params, retain_graph=True)
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        if self.config.grad_clip is None:
            actor_grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        else:
            actor_grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.actor_optimizer.step()
        return {
            "bc_loss": bc_loss.detach(),
            "q_loss": q_loss.detach(),
            "q_mean": q_policy_mean,
            "q_grad_norm": torch.nn.utils.get_total_norm(q_grads),
            "actor_grad_norm": actor_grad_norm,
        }

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One critic step, one actor step, one Polyak step of the target critic."""
        metrics = self.critic_step(batch)
        metrics |= self.actor_step(batch)
        polyak_update(self.critic_target, self.critic, self.config.tau)
        return metrics


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(agent: CPQLAgent, episodes: int, seed: int) -> dict[str, float]:
    """Runs `episodes` Pendulum-v1 episodes in lockstep; returns mean return and the success_once rate."""
    envs = [gym.make("Pendulum-v1") for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns = np.zeros(episodes)
    thetas, theta_dots = [], []
    for _ in range(200):
        torque = MAX_TORQUE * agent.act(torch.as_tensor(obs, dtype=torch.float32)).numpy()
        steps = [env.step(u) for env, u in zip(envs, torque)]
        obs = np.stack([step[0] for step in steps])
        returns += [step[1] for step in steps]
        thetas.append(np.arctan2(obs[:, 1], obs[:, 0]))
        theta_dots.append(obs[:, 2])
    success = success_once(np.stack(thetas, axis=1), np.stack(theta_dots, axis=1))
    return {"eval_return": float(returns.mean()), "eval_success_once": float(success.mean())}


# ------------------------------------------------------------------------------------------- training


def train(config: Config, steps: int, seed: int, quiet: bool = False) -> dict[str, float]:
    """Collects the offline data set, runs `steps` updates, evaluates; returns the final metrics."""
    rng = seed_everything(seed)
    data = collect_dataset(config, rng)
    agent = CPQLAgent(config)
    metrics: dict[str, Tensor] = {}
    with training_progress("cpql", steps, quiet) as advance:
        for _ in range(steps):
            metrics = agent.update(sample_batch(data, config.batch_size, rng))
            advance({k: metrics[k].item() for k in ("critic_loss", "q_mean", "q_grad_norm")})
    return (
        {k: v.item() for k, v in metrics.items()}
        | evaluate(agent, config.eval_episodes, seed + 10_000)
        | {"dataset_success_once": dataset_success_rate(data)}
    )


def optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    """The shared agent flags plus overrides of the variant's config (absent flags stay absent)."""
    parser = agent_parser(__doc__.splitlines()[0], VARIANTS, default_steps=3000)
    override = parser.add_argument_group("overrides of the variant's config")
    unset = argparse.SUPPRESS
    override.add_argument("--q-grad-mode", choices=list(Q_GRAD_STEPS), default=unset, help="Q-grad chain")
    override.add_argument("--q-norm", action=argparse.BooleanOptionalAction, default=unset, help="CPQL Q-loss")
    override.add_argument("--alpha", type=float, default=unset, help="Q-loss weight (CPQL's eta)")
    override.add_argument("--grad-clip", type=optional_float, default=unset, help="max norm or 'none'")
    override.add_argument("--cql-weight", type=float, default=unset, help="CQL penalty on the critic")
    return parser


def parse_config(args: argparse.Namespace) -> Config:
    """The variant's config, with every flag given on the command line overriding it."""
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    return replace(VARIANT_CONFIGS[args.variant], **overrides)


def main() -> None:
    torch.set_num_threads(1)
    args = build_parser().parse_args()
    metrics = train(parse_config(args), args.steps, args.seed, args.quiet)
    print_metrics(f"cpql ({args.variant}, seed {args.seed})", metrics)


if __name__ == "__main__":
    main()
