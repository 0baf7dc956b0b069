"""CALF, Critic as Lyapunov Function (seed 004; algorithms.md section 5), on Pendulum-v1 dynamics.

Algorithm (Osinenko et al., arXiv 2405.18118 / 2409.09869; theory semantics of regelum-calf `agent_calf`).
The critic q_w(s, a) is in reward form (q <= 0), so -q is a Lyapunov candidate. The agent keeps a
certified triple (s+, a+, w+). Each environment step t:
  1. the actor proposes a_t;
  2. one SGD step on the critic: the TD loss bootstraps from the certified weights w+ (the pivot), and
     hinge penalties push the candidate w* towards the constraints at (s_t, a_t);
  3. certify w* at (s_t, a_t):
     (D) decrease  q_{w*}(s_t, a_t) - q_{w+}(s+, a+) >= nu_bar,
     (K) bounds    kappa_low(|s_t|) <= -q_{w*}(s_t, a_t) <= kappa_up(|s_t|), with kappa(r) = C r^2;
  4. certified: (s+, a+, w+) <- (s_t, a_t, frozen copy of w*) and a_t is played;
     otherwise a_t is still played with probability P_relax (a relax event), else pi_0(s_t) (fallback);
  5. P_relax <- lambda_relax * P_relax, starting from P_relax = lambda_relax at the episode start.
Certified values rise by nu_bar each time and stay <= 0, so an episode has at most
-q_{w+_0}(s+_0, a+_0) / nu_bar certified steps; E[relax events] <= 1 / (1 - lambda_relax). After both are
spent pi_0 acts alone, so CALF reaches the goal G = {|theta| < 0.05, |theta_dot| < 0.2} whenever pi_0 does.

Choices, documented:
  - Environment: gymnasium Pendulum-v1 with the regelum-calf energy/PD expert as pi_0 (reaches G from
    any start within 172 steps); theta is wrapped, 0 = upright. |s| is the norm of the normalised
    state [theta / pi, theta_dot / 8], the same normalisation the critic's features use.
  - Critic: `quad-mix` features [s^2, s (x) a, a^2] (elementwise squares, 5 weights, no bias), trained
    by plain SGD, one step per environment step on the most recent transitions (buffer spans episodes).
  - A rejected candidate stays in the live critic (as in `agent_calfq`); only w+ stays put.
  - The triple changes only on certification (as in `agent_calf` and the theory; `agent_calfq` also
    moves it on relaxed steps, which voids the certified-step bound). The code's upper decrease cap
    nu_bar_max and its rising per-episode relax schedule are left out.
  - At an episode start the triple is (s_0, pi_0(s_0), copy of the live critic); if the live critic
    breaks the kappa bounds there, the initial weights (-q = C_init |s|^2, inside the bounds) are used.
  - Actor: deterministic tanh MLP with Gaussian exploration, trained DDPG-style by Adam to maximise the
    live critic's q on the buffer states. `--actor max-torque | uniform` replaces it by a deliberately
    bad fixed policy (seed 004 tests: CALF must still reach G).

Variants (seed 004 documents both):
  fixed              the constraint penalties carry gradient w.r.t. w through q_w(s_t, a_t).
  constraint-nograd  the penalties are computed under torch.no_grad(): a constant (dead) addend of the
                     critic loss, so the candidate is never pushed towards the constraints.

Expected gradient-flow facts (fixed variant):
  - `critic_opt` (SGD) owns exactly the live critic's weight; `actor_opt` (Adam) owns exactly the actor
    (absent for the fixed bad actors). No parameter is in two optimizers.
  - The certified critic w+ is a frozen deep copy (requires_grad False), in no optimizer, never sharing
    storage with the live critic; it is only evaluated under torch.no_grad() (TD target, q_{w+}(s+, a+)).
  - The TD target r + gamma q_{w+}(s', a') is computed under torch.no_grad(); the constraint penalties
    reach the critic weight through q_w(s_t, a_t) (in `constraint-nograd` they reach nothing).
  - The actor loss -q_w(s, actor(s)) flows through the live critic into the actor; it also fills the
    critic's .grad, which the critic's zero_grad wipes before the next critic backward (intended).
  - Certification and the relax filter run under torch.no_grad(). No gradient clipping.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from reference_agents.common.cli import agent_parser, seed_everything
from reference_agents.common.nets import mlp
from reference_agents.common.pendulum import (
    MAX_TORQUE,
    expert_torque,
    make_pendulum,
    pendulum_state,
    set_pendulum_state,
)
from reference_agents.common.progress import print_metrics, training_progress

VARIANTS = {
    "fixed": "constraint penalties carry gradient to the critic (seed 004)",
    "constraint-nograd": "constraint penalties under torch.no_grad(): a dead loss term (seed 004)",
}
ACTORS = ("learned", "max-torque", "uniform")
DTYPE = torch.float64
STATE_SCALE = torch.tensor([np.pi, 8.0], dtype=DTYPE)
GOAL_THETA, GOAL_THETA_DOT = 0.05, 0.2


@dataclass
class CalfConfig:
    variant: str = "fixed"
    """'fixed' or 'constraint-nograd' (see the module docstring)."""
    steps: int = 4000
    """Environment steps in total; every step tries one critic update and one certification."""
    seed: int = 0
    """Seeds torch (actor init) and the numpy generator (starts, exploration, relax draws)."""
    episode_steps: int = 400
    """Steps per episode: pi_0 needs up to 172 after the last actor step, so leave room for those."""
    actor: str = "learned"
    """'learned' (DDPG-style actor), or a deliberately bad fixed policy: 'max-torque' or 'uniform'."""
    lambda_relax: float = 0.9
    """Relaxation factor: P_relax starts here and is multiplied by it every step (0 = never relax)."""
    nu_bar: float = 1.0
    """Decrease threshold: a certified q must exceed the previous certified q by at least this."""
    kappa_low: float = 1.0
    """C_low of kappa_low(r) = C_low r^2, the lower bound on -q."""
    kappa_up: float = 2000.0
    """C_up of kappa_up(r) = C_up r^2, the upper bound on -q."""
    initial_scale: float = 100.0
    """Initial critic -q = initial_scale |s|^2 (no action terms): within the kappa bounds everywhere as long
    as kappa_low <= initial_scale <= kappa_up, so every episode can start from a valid certified triple."""
    discount: float = 1.0
    """gamma of the TD target (1 as in the regelum-calf pendulum preset)."""
    critic_lr: float = 0.05
    """SGD learning rate of the critic weights (the features are normalised to [-1, 1])."""
    buffer_size: int = 16
    """Number of most recent transitions in each critic TD step."""
    penalty_coef: float = 10.0
    """Weight of the hinge penalties on the decrease and kappa constraints in the critic loss."""
    actor_lr: float = 1e-3
    """Adam learning rate of the learned actor."""
    exploration_std: float = 0.5
    """Std of the Gaussian noise added to the learned actor's torque."""


class Transition(NamedTuple):
    """(s, a, r, s', a'): a' is the action actually played at s', as the TD target needs."""

    state: np.ndarray
    action: float
    reward: float
    next_state: np.ndarray
    next_action: float


class StepKind(StrEnum):
    """Who chose the played action."""

    CERTIFIED = "certified"
    RELAXED = "relaxed"
    FALLBACK = "fallback"


def normalised(state: torch.Tensor) -> torch.Tensor:
    return state / STATE_SCALE


def squared_norm(state: torch.Tensor) -> torch.Tensor:
    """|s|^2 of the normalised state, the argument of both kappa bounds."""
    return normalised(state).pow(2).sum(-1)


def in_goal(state: np.ndarray) -> bool:
    """G = {|theta| < 0.05, |theta_dot| < 0.2}, where pi_0 is verified to arrive within 172 steps."""
    return abs(state[0]) < GOAL_THETA and abs(state[1]) < GOAL_THETA_DOT


# ---------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------


def quad_mix_features(state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """[s^2, s (x) a, a^2] of the normalised state and action: (N, 2), (N, 1) -> (N, 5)."""
    s, a = normalised(state), action / MAX_TORQUE
    return torch.cat([s.pow(2), s * a, a.pow(2)], dim=-1)


class QuadMixCritic(nn.Module):
    """q_w(s, a) = w . features(s, a): linear in w, so (D) and (K) are linear constraints on w."""

    def __init__(self, initial_scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([-initial_scale, -initial_scale, 0.0, 0.0, 0.0], dtype=DTYPE))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return quad_mix_features(state, action) @ self.weight


class Actor(nn.Module):
    """Deterministic torque in [-2, 2] from the normalised state."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(2, 1, hidden=(32, 32)).to(DTYPE)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return MAX_TORQUE * torch.tanh(self.net(normalised(state)))


@dataclass(frozen=True)
class CertifiedTriple:
    """(s+, a+, w+) and the certified value q_{w+}(s+, a+); w+ is a frozen copy, never the live critic."""

    state: torch.Tensor
    action: torch.Tensor
    critic: QuadMixCritic
    value: float

    @classmethod
    def freeze(cls, state: torch.Tensor, action: torch.Tensor, critic: QuadMixCritic) -> CertifiedTriple:
        frozen = copy.deepcopy(critic).requires_grad_(False)
        with torch.no_grad():
            value = float(frozen(state, action))
        return cls(state.clone(), action.clone(), frozen, value)


# ---------------------------------------------------------------------------------------------------
# The CALF filter: relax schedule and the choice between the actor and pi_0
# ---------------------------------------------------------------------------------------------------


def relax_schedule(lambda_relax: float) -> Iterator[float]:
    """P_relax at steps t = 1, 2, ...: lambda_relax, lambda_relax^2, ... (Algorithm 1, step 8)."""
    probability = lambda_relax
    while True:
        yield probability
        probability *= lambda_relax


def calf_filter(certified: bool, relax_probability: float, u: float) -> StepKind:
    """Algorithm 1, steps 6-7: an uncertified action is kept only if u < P_relax (u ~ U[0, 1])."""
    if certified:
        return StepKind.CERTIFIED
    return StepKind.RELAXED if u < relax_probability else StepKind.FALLBACK


def kappa_bounds_hold(config: CalfConfig, state: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(K): kappa_low(|s|) <= -q <= kappa_up(|s|), elementwise."""
    r2 = squared_norm(state)
    return (config.kappa_low * r2 <= -q) & (-q <= config.kappa_up * r2)


class CalfAgent:
    """Live critic, certified triple, actor, and the filter that picks between the actor and pi_0."""

    def __init__(self, config: CalfConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.rng = rng
        self.initial_critic = QuadMixCritic(config.initial_scale).requires_grad_(False)
        self.critic = QuadMixCritic(config.initial_scale)
        self.critic_opt = torch.optim.SGD(self.critic.parameters(), lr=config.critic_lr)
        self.actor = Actor() if config.actor == "learned" else None
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr) if self.actor else None
        self.transitions: deque[Transition] = deque(maxlen=config.buffer_size)
        self.certified: CertifiedTriple
        self.relax_probabilities: Iterator[float]

    def begin_episode(self, state: np.ndarray) -> float:
        """Algorithm 1 initialisation: a_0 = pi_0(s_0), (s+, a+, w+) = (s_0, a_0, w_0), P_relax = lambda."""
        action = expert_torque(*state)
        s, a = as_batch(state, action)
        with torch.no_grad():
            live_critic_admissible = bool(kappa_bounds_hold(self.config, s, self.critic(s, a)))
        self.certified = CertifiedTriple.freeze(s, a, self.critic if live_critic_admissible else self.initial_critic)
        self.relax_probabilities = relax_schedule(self.config.lambda_relax)
        return action

    def propose(self, state: np.ndarray) -> float:
        """The actor's a_t ~ pi_t(. | s_t)."""
        if self.config.actor == "max-torque":
            return MAX_TORQUE
        if self.config.actor == "uniform":
            return float(self.rng.uniform(-MAX_TORQUE, MAX_TORQUE))
        with torch.no_grad():
            torque = float(self.actor(state_batch(state)))
        return float(np.clip(torque + self.config.exploration_std * self.rng.normal(), -MAX_TORQUE, MAX_TORQUE))

    def batch(self, state: np.ndarray, action: float) -> dict[str, torch.Tensor]:
        """The recent transitions for the TD loss, and (s_t, a_t) where the constraints are imposed."""
        states, actions, rewards, next_states, next_actions = zip(*self.transitions)
        probe_state, probe_action = as_batch(state, action)
        return {
            "state": torch.tensor(np.stack(states), dtype=DTYPE),
            "action": torch.tensor(actions, dtype=DTYPE)[:, None],
            "reward": torch.tensor(rewards, dtype=DTYPE),
            "next_state": torch.tensor(np.stack(next_states), dtype=DTYPE),
            "next_action": torch.tensor(next_actions, dtype=DTYPE)[:, None],
            "probe_state": probe_state,
            "probe_action": probe_action,
        }

    # ------------------------------------------ loss block ------------------------------------------

    def constraint_penalty(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Hinge penalties on (D) and (K) at (s_t, a_t); only the q_{w+}(s+, a+) side is a constant.

        `constraint-nograd` computes them under torch.no_grad(): the value is right, the gradient is gone.
        """
        cfg = self.config
        with torch.no_grad() if cfg.variant == "constraint-nograd" else torch.enable_grad():
            q = self.critic(state, action)
            r2 = squared_norm(state)
            decrease_violation = F.relu(cfg.nu_bar - (q - self.certified.value))
            kappa_violation = F.relu(cfg.kappa_low * r2 + q) + F.relu(-q - cfg.kappa_up * r2)
            return cfg.penalty_coef * (decrease_violation + kappa_violation).mean()

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One SGD step on the critic (the candidate w*), then one actor step against the live critic."""
        with torch.no_grad():
            next_q = self.certified.critic(batch["next_state"], batch["next_action"])
            td_target = batch["reward"] + self.config.discount * next_q
        td_loss = 0.5 * F.mse_loss(self.critic(batch["state"], batch["action"]), td_target)
        constraint_penalty = self.constraint_penalty(batch["probe_state"], batch["probe_action"])
        critic_loss = td_loss + constraint_penalty
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        metrics = {"critic_loss": critic_loss, "td_loss": td_loss, "constraint_penalty": constraint_penalty}

        if self.actor is not None:
            actor_loss = -self.critic(batch["state"], self.actor(batch["state"])).mean()
            self.actor_opt.zero_grad()
            actor_loss.backward()
            self.actor_opt.step()
            metrics["actor_loss"] = actor_loss
        return {name: value.detach() for name, value in metrics.items()}

    # ------------------------------------------------------------------------------------------------

    def certify(self, state: np.ndarray, action: float) -> bool:
        """Checks (D) and (K) for the live critic w* at (s_t, a_t); on success w+ becomes a copy of w*."""
        s, a = as_batch(state, action)
        with torch.no_grad():
            q = self.critic(s, a)
        certified = float(q) - self.certified.value >= self.config.nu_bar and bool(kappa_bounds_hold(self.config, s, q))
        if certified:
            self.certified = CertifiedTriple.freeze(s, a, self.critic)
        return certified

    def act(self, state: np.ndarray) -> tuple[float, StepKind]:
        """One CALF step at s_t: propose, update critic and actor, certify, filter (P_relax then decays)."""
        proposal = self.propose(state)
        if self.transitions:
            self.update(self.batch(state, proposal))
        certified = self.certify(state, proposal)
        kind = calf_filter(certified, next(self.relax_probabilities), float(self.rng.uniform()))
        return (expert_torque(*state) if kind is StepKind.FALLBACK else proposal), kind

    def record(self, transition: Transition) -> None:
        """Stores (s, a, r, s', a') once the action a' played at s' is known."""
        self.transitions.append(transition)


def state_batch(state: np.ndarray) -> torch.Tensor:
    return torch.tensor(state, dtype=DTYPE)[None]


def as_batch(state: np.ndarray, action: float) -> tuple[torch.Tensor, torch.Tensor]:
    return state_batch(state), torch.tensor([[action]], dtype=DTYPE)


# ---------------------------------------------------------------------------------------------------
# Episodes and training
# ---------------------------------------------------------------------------------------------------


@dataclass
class EpisodeLog:
    """One episode: `kinds[t]` says who chose the action at `states[t]` (t = 0 is pi_0's); `states` ends
    with the state after the last action."""

    kinds: list[StepKind]
    states: list[np.ndarray]
    cost: float
    initial_certified_value: float

    def count(self, kind: StepKind) -> int:
        return self.kinds.count(kind)

    @property
    def reached_goal(self) -> bool:
        """In G after the last action."""
        return in_goal(self.states[-1])


def run_episode(agent: CalfAgent, env: gym.Env, start: tuple[float, float], steps: int) -> EpisodeLog:
    """Plays `steps` actions from `start`; the first is pi_0's (Algorithm 1 initialisation)."""
    set_pendulum_state(env, *start)
    state = pendulum_state(env)
    action, kind = agent.begin_episode(state), StepKind.FALLBACK
    log = EpisodeLog(kinds=[], states=[], cost=0.0, initial_certified_value=agent.certified.value)
    for t in range(steps):
        log.kinds.append(kind)
        log.states.append(state)
        _, reward, _, _, _ = env.step(np.array([action], dtype=np.float32))
        next_state = pendulum_state(env)
        log.cost -= float(reward)
        if t + 1 < steps:
            next_action, kind = agent.act(next_state)
            agent.record(Transition(state, action, float(reward), next_state, next_action))
            state, action = next_state, next_action
    log.states.append(next_state)
    return log


def episode_metrics(log: EpisodeLog) -> dict[str, float]:
    return {
        "certified": log.count(StepKind.CERTIFIED),
        "relaxed": log.count(StepKind.RELAXED),
        "fallback": log.count(StepKind.FALLBACK),
        "cost": log.cost,
        "reached_goal": float(log.reached_goal),
    }


def train(config: CalfConfig, quiet: bool = False) -> list[EpisodeLog]:
    """Episodes of `episode_steps` from random starts (theta ~ U[-pi, pi], theta_dot ~ U[-1, 1])."""
    rng = seed_everything(config.seed)
    agent = CalfAgent(config, rng)
    env = make_pendulum(config.seed)
    lengths = [config.episode_steps] * (config.steps // config.episode_steps)
    lengths += [config.steps % config.episode_steps] if config.steps % config.episode_steps else []
    logs = []
    with training_progress(f"CALF ({config.variant}, actor {config.actor})", len(lengths), quiet) as advance:
        for length in lengths:
            start = (float(rng.uniform(-np.pi, np.pi)), float(rng.uniform(-1.0, 1.0)))
            logs.append(run_episode(agent, env, start, length))
            advance(episode_metrics(logs[-1]))
    return logs


def print_episodes(logs: list[EpisodeLog]) -> None:
    """Who acted in each episode: certified actor steps, relaxed actor steps, pi_0 fallbacks."""
    table = Table(title="CALF episodes")
    for column in ("episode", "certified", "relaxed", "fallback", "cost", "reached G"):
        table.add_column(column, justify="right")
    for index, log in enumerate(logs):
        m = episode_metrics(log)
        table.add_row(
            str(index),
            *(f"{m[k]:.0f}" for k in ("certified", "relaxed", "fallback")),
            f"{m['cost']:.1f}",
            "yes" if log.reached_goal else "no",
        )
    Console().print(table)


def main() -> None:
    torch.set_num_threads(1)
    defaults = CalfConfig()
    parser = agent_parser(
        "CALF: an actor filtered by a critic-as-Lyapunov-function certificate, falling back to pi_0.",
        VARIANTS,
        defaults.steps,
    )
    parser.add_argument("--actor", choices=ACTORS, default=defaults.actor, help="who proposes actions")
    parser.add_argument("--episode-steps", type=int, default=defaults.episode_steps)
    parser.add_argument("--lambda-relax", type=float, default=defaults.lambda_relax, help="relaxation factor")
    parser.add_argument("--nu-bar", type=float, default=defaults.nu_bar, help="decrease threshold")
    parser.add_argument("--kappa-low", type=float, default=defaults.kappa_low, help="C of kappa_low = C r^2")
    parser.add_argument("--kappa-up", type=float, default=defaults.kappa_up, help="C of kappa_up = C r^2")
    parser.add_argument("--penalty-coef", type=float, default=defaults.penalty_coef)
    args = parser.parse_args()
    config = CalfConfig(
        variant=args.variant,
        steps=args.steps,
        seed=args.seed,
        episode_steps=args.episode_steps,
        actor=args.actor,
        lambda_relax=args.lambda_relax,
        nu_bar=args.nu_bar,
        kappa_low=args.kappa_low,
        kappa_up=args.kappa_up,
        penalty_coef=args.penalty_coef,
    )
    logs = train(config, quiet=args.quiet)
    print_episodes(logs)
    per_episode = [episode_metrics(log) for log in logs]
    print_metrics(
        f"CALF ({config.variant}) over {len(logs)} episodes",
        {f"mean {key}": float(np.mean([m[key] for m in per_episode])) for key in per_episode[0]},
    )


if __name__ == "__main__":
    main()
