"""Distributional PPO with a CVaR penalty and a Lagrangian CVaR constraint (seeds 000 and 001).

Algorithm (algorithms.md §1, §2). A Gaussian actor and a categorical critic over fixed atoms z_k
(C51, two-hot projection of Monte-Carlo returns) are trained by clipped PPO on RiskyChoice-v0
(reference_agents/common/risky_choice.py: one real action per step, a > 0 is the risky arm).
The constraint is CVaR_alpha(Z) >= kappa on the episode return Z. The multiplier lambda is a plain
float updated by projected dual ascent after each rollout: lambda <- clip(lambda + rho * (kappa -
CVaR_emp(Z)), 0, lambda_max), with the *signed* gap, so lambda also falls once the constraint is slack.

Three versions of the constraint (seed 000):
1. Bug (variant `cvar-empirical`): the violation is computed from the observed returns,
   `torch.as_tensor(np_returns)`, and added as `loss = loss + loss.new_tensor(lam) * violation`.
   The tensor has no autograd history, so the term is a constant: every gradient equals the
   lambda = 0 case and the constraint does nothing; the policy goes all-risky. (The seed used
   per-step rewards, a second mistake, §1e-2; both versions here use episode returns, so the only
   difference in the loss is the missing path.)
2. The seed's own fix: the violation from the critic's predicted CVaR_alpha(p(.|s_0)). It carries
   gradient, but with separate actor and critic networks only into the critic (§1c): it pulls the
   critic's predicted tail up to kappa, and the policy never feels the constraint.
3. Correct (variant `fixed`, default): keep the seed fix's term, and route the constraint to the
   policy as RCPO does, through a penalised reward in the Rockafellar-Uryasev form
   CVaR_alpha(Z) = max_nu [nu - E(nu - Z)^+ / alpha]: each finished episode gets
   -(lambda / alpha) (nu - Z)^+ added to its last reward before GAE, with nu the rollout's empirical
   VaR_alpha, the maximiser of the empirical RU objective. (§1a's ascent nu += eta (1 - P(Z <= nu)
   / alpha) has the same fixed point, but on this env's lattice of returns it keeps overshooting
   VaR = 2.5 and then penalises every all-safe episode.) The critic still models the raw return,
   the constrained quantity; the penalty reaches the actor through ratio * sg(advantage).

PPO details from seed 001 (§2c), each a flag: log-ratio clamp (a NaN guard; +-20 vs +-10 only
differ when |log r| > 10, and clamping zeroes those samples' gradient), KL measure (k3 `approx` or
the `exact` Gaussian KL from the (mu, sigma) stored in the rollout), advantage normalisation
(none / minibatch / global / group (per episode, singletons -> 0) / robust (median, IQR / 1.349)),
SB3-style early stopping before the step when KL > 1.5 target_kl, an optional behaviour-cloning
term towards an always-safe expert whose coefficient follows the actor-gradient-norm ratio
(two-sided), and non-finite log-ratios masked before exp, excluded from the mean and counted.

Expected gradient-flow facts (the oracle for a clean audit of `fixed`):
- One Adam optimizer owns actor (mean MLP and log_std) and critic (logits MLP); nothing else.
  lambda and nu are Python floats, in no optimizer; the atoms are a buffer.
- Policy loss -> actor only. Value loss (cross-entropy to two-hot targets) -> critic only.
- CVaR constraint term lambda * (kappa - CVaR_pred)^+ -> critic only (zero on the actor by
  construction); zero gradient while the predicted CVaR is above kappa. The CVaR penalty
  (off by default) likewise reaches only the critic. BC term (off by default) -> actor only.
- Intended detaches: advantages, two-hot targets, old log-probs, old (mu, sigma) and the RU
  penalty are computed without autograd; the KL used for early stopping is measured without grad.
- Clipping: global gradient norm 0.5 over actor and critic after backward, before the step;
  ratio clipped at 1 +- 0.2 inside the loss; log-ratio clamped at +-20 before exp.
- zero_grad before every backward; one backward and one step per minibatch.
- In `cvar-empirical` the constraint addend has no path to any parameter (the seed's bug).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Normal

from reference_agents.common.cli import agent_parser, seed_everything
from reference_agents.common.nets import mlp
from reference_agents.common.progress import print_metrics, training_progress
from reference_agents.common.risky_choice import (
    HORIZON,
    SAFE_ACTION,
    RiskyChoiceEnv,
    exact_return_distribution,
    return_atoms,
)

VARIANTS = {
    "fixed": "predicted-CVaR constraint term plus RU penalised reward for the policy (seed 000, correct)",
    "cvar-empirical": "constraint violation from observed returns: a constant, dead term (seed 000 bug)",
}
ADV_NORMS = ("none", "minibatch", "global", "group", "robust")
KL_ESTIMATORS = ("approx", "exact")


@dataclass
class Config:
    """Defaults follow algorithms.md §1d and §2b (CleanRL), scaled to RiskyChoice-v0."""

    variant: str = "fixed"
    """`fixed` or `cvar-empirical`; see the module docstring."""
    iterations: int = 150
    """Rollout-and-update iterations (`--steps`); 150 x 320 = 48k environment steps."""
    episodes_per_rollout: int = 64
    """Parallel RiskyChoice episodes per rollout (64 x 5 = 320 transitions)."""
    update_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 4
    """Minibatches per pass; one optimizer step each."""
    initial_action_mean: float = -1.0
    """Start cautious, P(risky) = Phi(-1) = 0.16 per step. From 0.5 the CVaR is flat in the risk level
    (exactly -1.26 at 0.4 to -1.39 at 0.9, then -1.19 at 1), so no local method finds the feasible set."""
    learning_rate: float = 1e-3
    """Adam step size for actor and critic."""
    adam_eps: float = 1e-5
    """Adam epsilon, as in CleanRL."""
    gamma: float = 1.0
    """Discount; RiskyChoice is a fixed-horizon episode with gamma = 1."""
    gae_lambda: float = 1.0
    """GAE lambda. 1 keeps advantages unbiased although the critic models the unpenalised return."""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon."""
    vf_coef: float = 0.5
    """Weight of the critic's cross-entropy loss."""
    ent_coef: float = 0.0
    """Entropy bonus weight (CleanRL continuous default: 0, term omitted)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip over actor and critic."""
    log_ratio_clamp: float = 20.0
    """NaN guard on log pi_new - log pi_old before exp (seed 001 proposes 10)."""
    kl_estimator: str = "approx"
    """`approx`: k3 = (r - 1) - log r per sample; `exact`: closed-form Gaussian KL(old || new)."""
    adv_norm: str = "minibatch"
    """Advantage normalisation: none, minibatch (CleanRL), global, group (per episode), robust."""
    target_kl: float | None = None
    """SB3-style early stopping: skip the rest of the update once a minibatch's KL > 1.5 x this."""
    max_masked_fraction: float = 0.1
    """Skip a minibatch's step when more than this fraction of its log-ratios are non-finite."""
    bc_coef: float = 0.0
    """Initial weight of behaviour cloning towards the always-safe expert; 0 leaves the term out."""
    bc_grad_ratio: float = 0.5
    """Target of ||grad_actor(bc_coef L_BC)|| / ||grad_actor L_clip||; bc_coef moves x1.5 either way."""
    cvar_alpha: float = 0.1
    """Tail level alpha of the constrained CVaR."""
    cvar_limit: float = 1.0
    """kappa: the constraint is CVaR_alpha(Z) >= kappa, in return units."""
    cvar_penalty_coef: float = 0.0
    """beta: weight of the seed's -beta * CVaR_pred penalty (reaches the critic only); 0 leaves it out."""
    dual_lr: float = 0.1
    """rho: dual ascent step on lambda per rollout."""
    lambda_init: float = 1.0
    """Initial Lagrange multiplier. From 0, some seeds let the mean-return gradient carry the policy onto
    the flat, infeasible part of the CVaR curve before lambda has grown, and stay all-risky."""
    lambda_max: float = 10.0
    """Projection bound on lambda."""


def as_tensor(values: np.ndarray | Sequence[float]) -> Tensor:
    """Rollout data in torch's default dtype (the tests run in float64)."""
    return torch.as_tensor(np.asarray(values), dtype=torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------------
# Distributional pieces: CVaR of a discrete distribution, two-hot projection (§1a)
# ---------------------------------------------------------------------------------------------------


def lower_tail_cvar(probs: Tensor, values: Tensor, alpha: float) -> Tensor:
    """CVaR_alpha = (1/alpha) sum_k min(p_k, (alpha - F_{k-1})^+) z_k over ascending `values`."""
    mass_below = torch.cumsum(probs, dim=-1) - probs
    tail_weights = torch.minimum(probs, torch.relu(alpha - mass_below))
    return (tail_weights * values).sum(-1) / alpha


def expected_value(logits: Tensor, atoms: Tensor) -> Tensor:
    """V(s) = sum_k p_k z_k, the baseline for GAE."""
    return (torch.softmax(logits, -1) * atoms).sum(-1)


def empirical_cvar(samples: Tensor, alpha: float) -> Tensor:
    """CVaR_alpha of the empirical distribution of `samples` (the same formula, weights 1/n)."""
    ordered = torch.sort(samples).values
    return lower_tail_cvar(torch.full_like(ordered, 1 / len(ordered)), ordered, alpha)


def empirical_var(samples: np.ndarray, alpha: float) -> float:
    """VaR_alpha = the smallest sample z with F(z) >= alpha; it maximises the empirical RU objective."""
    return float(np.sort(samples)[math.ceil(alpha * len(samples)) - 1])


def two_hot(returns: Tensor, atoms: Tensor) -> Tensor:
    """C51 projection of scalar returns onto evenly spaced atoms; the target's mean is clip(G)."""
    position = (returns.clamp(atoms[0], atoms[-1]) - atoms[0]) / (atoms[1] - atoms[0])
    lower = position.floor().long()
    upper = position.ceil().long()
    upper_weight = position - lower
    target = torch.zeros(*returns.shape, len(atoms), dtype=returns.dtype)
    target.scatter_add_(-1, lower.unsqueeze(-1), (1 - upper_weight).unsqueeze(-1))
    target.scatter_add_(-1, upper.unsqueeze(-1), upper_weight.unsqueeze(-1))
    return target


# ---------------------------------------------------------------------------------------------------
# PPO pieces: GAE, advantage normalisation, KL, the masked clipped policy loss (§2a, §2c)
# ---------------------------------------------------------------------------------------------------


def generalized_advantages(rewards: Tensor, values: Tensor, gamma: float, gae_lambda: float) -> Tensor:
    """GAE over (episodes, steps) of whole episodes: each ends terminal, so nothing past it is bootstrapped."""
    advantages = torch.zeros_like(rewards)
    running = next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * gae_lambda * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages


def standardise(advantages: Tensor) -> Tensor:
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def group_standardise(advantages: Tensor, groups: Tensor) -> Tensor:
    """Standardise within each group; a singleton group is set to 0 so it contributes no gradient."""
    normalised = torch.zeros_like(advantages)
    for group in torch.unique(groups):
        members = groups == group
        if members.sum() > 1:
            normalised[members] = standardise(advantages[members])
    return normalised


def robust_standardise(advantages: Tensor) -> Tensor:
    """(A - median) / max(IQR / 1.349, 1e-8): IQR / 1.349 is the std of a Gaussian, so scales stay comparable."""
    q25, median, q75 = torch.quantile(advantages, advantages.new_tensor([0.25, 0.5, 0.75]))
    return (advantages - median) / torch.clamp((q75 - q25) / 1.349, min=1e-8)


def normalise_rollout_advantages(advantages: Tensor, mode: str, groups: Tensor) -> Tensor:
    """The once-per-rollout modes; `minibatch` and `none` pass through (minibatch is done per minibatch)."""
    if mode == "global":
        return standardise(advantages)
    if mode == "group":
        return group_standardise(advantages, groups)
    if mode == "robust":
        return robust_standardise(advantages)
    return advantages


def gaussian_kl(mean_old: Tensor, std_old: Tensor, mean_new: Tensor, std_new: Tensor) -> Tensor:
    """Exact KL(N_old || N_new) for diagonal Gaussians, summed over action dimensions."""
    per_dim = torch.log(std_new / std_old) + (std_old**2 + (mean_old - mean_new) ** 2) / (2 * std_new**2) - 0.5
    return per_dim.sum(-1)


class PolicyLoss(NamedTuple):
    loss: Tensor
    """Clipped surrogate averaged over the finite samples only."""
    log_ratio: Tensor
    """log r with non-finite entries replaced by 0, then clamped."""
    finite: Tensor
    """Which samples had a finite log-ratio."""
    clamped: Tensor
    """Which finite samples hit the log-ratio clamp (their gradient is zero)."""


def clipped_policy_loss(
    new_log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_coef: float, log_ratio_clamp: float
) -> PolicyLoss:
    """PPO's L_clip with non-finite log-ratios masked *before* exp (a where() after exp leaks NaN gradients)."""
    raw_log_ratio = new_log_prob - old_log_prob
    finite = torch.isfinite(raw_log_ratio)
    safe_log_ratio = torch.where(finite, raw_log_ratio, torch.zeros_like(raw_log_ratio))
    log_ratio = safe_log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = log_ratio.exp()
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    loss = torch.where(finite, surrogate, torch.zeros_like(surrogate)).sum() / finite.sum().clamp(min=1)
    clamped = finite & (safe_log_ratio.abs() > log_ratio_clamp)
    return PolicyLoss(loss, log_ratio, finite, clamped)


# ---------------------------------------------------------------------------------------------------
# Networks (separate actor and critic, CleanRL style)
# ---------------------------------------------------------------------------------------------------


class GaussianActor(nn.Module):
    """pi(a|s) = N(mu(s), sigma) with a state-independent log-std parameter; mu's output bias starts at
    `initial_mean` (CleanRL's 0.01-gain output layer keeps mu(s) close to it)."""

    def __init__(self, obs_dim: int, action_dim: int, initial_mean: float) -> None:
        super().__init__()
        self.mean = mlp(obs_dim, action_dim, out_gain=0.01)
        nn.init.constant_(self.mean[-1].bias, initial_mean)
        self.log_std = nn.Parameter(torch.zeros(action_dim))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.mean(obs)
        return mean, self.log_std.exp().expand_as(mean)


class DistributionalCritic(nn.Module):
    """Logits of p(z_k | s) over fixed atoms z_k."""

    def __init__(self, obs_dim: int, atoms: Tensor) -> None:
        super().__init__()
        self.logits = mlp(obs_dim, len(atoms), out_gain=1.0)
        self.register_buffer("atoms", atoms)

    def forward(self, obs: Tensor) -> Tensor:
        return self.logits(obs)


# ---------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------


@dataclass
class Episodes:
    """One rollout of whole episodes, every field (episodes, steps, ...), all without autograd history."""

    obs: Tensor
    actions: Tensor
    action_means: Tensor
    action_stds: Tensor
    log_probs: Tensor
    values: Tensor
    rewards: Tensor
    risky: Tensor

    @property
    def returns(self) -> np.ndarray:
        """Observed episode returns Z, as the seed keeps them: numpy."""
        return self.rewards.sum(1).numpy()


@dataclass
class Batch:
    """What `update` consumes: flattened per-step tensors, plus the per-episode data of the constraint."""

    steps: dict[str, Tensor]
    initial_obs: Tensor
    """s_0 of every episode: the predicted CVaR of Z is read there."""
    episode_returns: np.ndarray
    """Observed Z; only the seed's buggy constraint reads it inside the loss."""

    def __len__(self) -> int:
        return len(self.steps["advantages"])

    def minibatch(self, indices: Tensor) -> dict[str, Tensor]:
        return {name: values[indices] for name, values in self.steps.items()}


# ---------------------------------------------------------------------------------------------------
# The agent
# ---------------------------------------------------------------------------------------------------


class DistributionalPPO:
    def __init__(self, cfg: Config, seed: int = 0) -> None:
        self.cfg = cfg
        rng = seed_everything(seed)
        self.envs = [RiskyChoiceEnv() for _ in range(cfg.episodes_per_rollout)]
        for env in self.envs:
            env.reset(seed=int(rng.integers(2**31)))
        obs_dim = RiskyChoiceEnv.observation_space.shape[0]
        self.actor = GaussianActor(obs_dim, RiskyChoiceEnv.action_space.shape[0], cfg.initial_action_mean)
        self.critic = DistributionalCritic(obs_dim, as_tensor(return_atoms()))
        self.optimizer = torch.optim.Adam(
            chain(self.actor.parameters(), self.critic.parameters()), lr=cfg.learning_rate, eps=cfg.adam_eps
        )
        self.lam = cfg.lambda_init
        self.nu = cfg.cvar_limit  # replaced by the first rollout's VaR before it is used
        self.bc_coef = cfg.bc_coef

    @torch.no_grad()
    def collect_episodes(self) -> Episodes:
        """Runs every env for one whole episode; actions sampled from the current Gaussian policy."""
        obs = np.stack([env.reset()[0] for env in self.envs])
        columns: dict[str, list[Tensor]] = defaultdict(list)
        for _ in range(HORIZON):
            obs_t = as_tensor(obs)
            mean, std = self.actor(obs_t)
            action = mean + std * torch.randn_like(mean)
            outcomes = [env.step(a.numpy()) for env, a in zip(self.envs, action)]
            columns["obs"].append(obs_t)
            columns["actions"].append(action)
            columns["action_means"].append(mean)
            columns["action_stds"].append(std)
            columns["log_probs"].append(Normal(mean, std).log_prob(action).sum(-1))
            columns["values"].append(expected_value(self.critic(obs_t), self.critic.atoms))
            columns["rewards"].append(as_tensor([reward for _, reward, *_ in outcomes]))
            columns["risky"].append(torch.tensor([info["risky"] for *_, info in outcomes]))
            obs = np.stack([next_obs for next_obs, *_ in outcomes])
        return Episodes(**{name: torch.stack(column, dim=1) for name, column in columns.items()})

    def dual_step(self, episode_returns: np.ndarray) -> dict[str, float]:
        """Projected dual ascent on lambda with the signed gap; nu <- VaR_alpha, the RU maximiser."""
        cfg = self.cfg
        cvar = empirical_cvar(as_tensor(episode_returns), cfg.cvar_alpha).item()
        gap = cfg.cvar_limit - cvar
        self.lam = min(max(0.0, self.lam + cfg.dual_lr * gap), cfg.lambda_max)
        self.nu = empirical_var(episode_returns, cfg.cvar_alpha)
        return {"empirical_cvar": cvar, "cvar_gap": gap, "lambda": self.lam, "nu": self.nu}

    @torch.no_grad()
    def make_batch(self, episodes: Episodes) -> Batch:
        """Advantages from (penalised) rewards; critic targets from raw Monte-Carlo returns."""
        cfg = self.cfg
        shaped_rewards = episodes.rewards.clone()
        if cfg.variant == "fixed":
            shortfall = torch.relu(self.nu - episodes.rewards.sum(1))
            shaped_rewards[:, -1] -= self.lam / cfg.cvar_alpha * shortfall
        advantages = generalized_advantages(shaped_rewards, episodes.values, cfg.gamma, cfg.gae_lambda)
        raw_returns = generalized_advantages(episodes.rewards, torch.zeros_like(episodes.values), cfg.gamma, 1.0)
        episode_ids = torch.arange(len(advantages)).unsqueeze(1).expand_as(advantages)
        flat = {
            "obs": episodes.obs.flatten(0, 1),
            "actions": episodes.actions.flatten(0, 1),
            "log_probs": episodes.log_probs.flatten(),
            "action_means": episodes.action_means.flatten(0, 1),
            "action_stds": episodes.action_stds.flatten(0, 1),
            "value_targets": two_hot(raw_returns.flatten(), self.critic.atoms),
            "episode_ids": episode_ids.flatten(),
        }
        flat["advantages"] = normalise_rollout_advantages(advantages.flatten(), cfg.adv_norm, flat["episode_ids"])
        return Batch(flat, episodes.obs[:, 0], episodes.returns)

    # -------------------------------------------------------------------------------------------
    # The loss block (§1a, §2a): every ingredient in `losses`, their weighted sum in `total_loss`
    # -------------------------------------------------------------------------------------------

    def losses(self, minibatch: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Every loss ingredient of one minibatch, unweighted, plus the quantities monitored beside them."""
        cfg = self.cfg
        mean, std = self.actor(minibatch["obs"])
        policy = Normal(mean, std)
        advantages = minibatch["advantages"]
        if cfg.adv_norm == "minibatch":
            advantages = standardise(advantages)
        ppo = clipped_policy_loss(
            policy.log_prob(minibatch["actions"]).sum(-1),
            minibatch["log_probs"],
            advantages,
            cfg.clip_coef,
            cfg.log_ratio_clamp,
        )
        with torch.no_grad():
            ratio = ppo.log_ratio.exp()
            if cfg.kl_estimator == "exact":
                per_sample_kl = gaussian_kl(minibatch["action_means"], minibatch["action_stds"], mean, std)
            else:
                per_sample_kl = (ratio - 1) - ppo.log_ratio
            finite = ppo.finite.to(ratio.dtype)
            kl = (per_sample_kl * finite).sum() / finite.sum().clamp(min=1)

        log_probs = torch.log_softmax(self.critic(minibatch["obs"]), -1)
        value_loss = -(minibatch["value_targets"] * log_probs).sum(-1).mean()
        initial_probs = torch.softmax(self.critic(batch.initial_obs), -1)
        predicted_cvar = lower_tail_cvar(initial_probs, self.critic.atoms, cfg.cvar_alpha).mean()

        if cfg.variant == "cvar-empirical":
            # seed 000 as written: observed returns have no autograd history, so neither has the violation
            observed_returns = torch.as_tensor(batch.episode_returns, dtype=predicted_cvar.dtype)
            cvar_gap = cfg.cvar_limit - empirical_cvar(observed_returns, cfg.cvar_alpha)
            cvar_violation = torch.clamp(cvar_gap, min=0.0)
        else:
            cvar_violation = torch.relu(cfg.cvar_limit - predicted_cvar)

        expert_actions = torch.full_like(minibatch["actions"], SAFE_ACTION)
        return {
            "policy": ppo.loss,
            "value": value_loss,
            "entropy": policy.entropy().sum(-1).mean(),
            "behaviour_cloning": -policy.log_prob(expert_actions).sum(-1).mean(),
            "predicted_cvar": predicted_cvar,
            "cvar_violation": cvar_violation,
            "kl": kl,
            "clip_fraction": ((ratio - 1).abs() > cfg.clip_coef)[ppo.finite].to(ratio.dtype).mean(),
            "clamped_fraction": ppo.clamped.to(ratio.dtype).mean(),
            "masked": (~ppo.finite).sum(),
        }

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """L_clip + c_v L_V [- c_ent H] [+ bc L_BC] [- beta CVaR_pred] + lambda * violation."""
        cfg = self.cfg
        loss = losses["policy"] + cfg.vf_coef * losses["value"]
        if cfg.ent_coef:
            loss = loss - cfg.ent_coef * losses["entropy"]
        if self.bc_coef:
            loss = loss + self.bc_coef * losses["behaviour_cloning"]
        if cfg.cvar_penalty_coef:
            loss = loss - cfg.cvar_penalty_coef * losses["predicted_cvar"]
        loss = loss + loss.new_tensor(self.lam) * losses["cvar_violation"]
        return loss

    def actor_grad_norm(self, term: Tensor) -> Tensor:
        grads = torch.autograd.grad(term, list(self.actor.parameters()), retain_graph=True, allow_unused=True)
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))

    def adapt_bc_coef(self, losses: dict[str, Tensor]) -> float:
        """Two-sided: compare gradient norms on the actor, not loss values (L_clip ~ 0 at r = 1, §2c-5)."""
        bc_norm = self.bc_coef * self.actor_grad_norm(losses["behaviour_cloning"])
        ratio = (bc_norm / self.actor_grad_norm(losses["policy"]).clamp(min=1e-12)).item()
        if ratio > 1.5 * self.cfg.bc_grad_ratio:
            self.bc_coef /= 1.5
        elif ratio < self.cfg.bc_grad_ratio / 1.5:
            self.bc_coef *= 1.5
        return ratio

    def update(self, batch: Batch) -> dict[str, Tensor]:
        """PPO epochs over one rollout; returns the minibatch-averaged monitors and step counts."""
        cfg = self.cfg
        size = len(batch) // cfg.num_minibatches
        monitors: dict[str, list[Tensor]] = defaultdict(list)
        counts = {"optimizer_steps": 0, "skipped_nonfinite": 0, "early_stopped": 0, "masked": 0}
        for _ in range(cfg.update_epochs):
            order = torch.randperm(len(batch))
            for start in range(0, size * cfg.num_minibatches, size):
                losses = self.losses(batch.minibatch(order[start : start + size]), batch)
                counts["masked"] += int(losses["masked"])
                if cfg.target_kl is not None and losses["kl"] > 1.5 * cfg.target_kl:
                    counts["early_stopped"] = 1
                    break
                if losses["masked"] > cfg.max_masked_fraction * size:
                    counts["skipped_nonfinite"] += 1
                    continue
                if self.bc_coef:
                    monitors["bc_ppo_grad_ratio"].append(torch.tensor(self.adapt_bc_coef(losses)))
                loss = self.total_loss(losses)
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(chain(self.actor.parameters(), self.critic.parameters()), cfg.max_grad_norm)
                self.optimizer.step()
                counts["optimizer_steps"] += 1
                for name in ("policy", "value", "predicted_cvar", "cvar_violation", "kl", "clip_fraction"):
                    monitors[name].append(losses[name].detach())
                monitors["clamped_fraction"].append(losses["clamped_fraction"])
            if counts["early_stopped"]:
                break
        metrics = {name: torch.stack(values).mean() for name, values in monitors.items()}
        metrics.update({name: torch.tensor(count) for name, count in counts.items()})
        metrics["bc_coef"] = torch.tensor(self.bc_coef)
        return metrics

    @torch.no_grad()
    def policy_report(self) -> dict[str, float]:
        """The current policy's exact risk per step and exact return statistics (no sampling noise)."""
        obs = torch.eye(HORIZON, dtype=torch.get_default_dtype())
        mean, std = self.actor(obs)
        risk = Normal(0.0, 1.0).cdf(mean / std).squeeze(-1).numpy()
        probs = as_tensor(exact_return_distribution(risk))
        predicted = torch.softmax(self.critic(obs[:1]), -1)[0]
        return {
            "risky_steps_per_episode": float(risk.sum()),
            "exact_mean_return": float((probs * self.critic.atoms).sum()),
            "exact_cvar": lower_tail_cvar(probs, self.critic.atoms, self.cfg.cvar_alpha).item(),
            "predicted_cvar": lower_tail_cvar(predicted, self.critic.atoms, self.cfg.cvar_alpha).item(),
        }


# ---------------------------------------------------------------------------------------------------
# Training and command line
# ---------------------------------------------------------------------------------------------------


def train(cfg: Config, seed: int = 0, quiet: bool = False) -> tuple[DistributionalPPO, dict[str, float]]:
    agent = DistributionalPPO(cfg, seed)
    with training_progress(f"distributional_ppo {cfg.variant}", cfg.iterations, quiet) as advance:
        for _ in range(cfg.iterations):
            episodes = agent.collect_episodes()
            dual = agent.dual_step(episodes.returns)
            update = agent.update(agent.make_batch(episodes))
            metrics = {
                "risky_fraction": episodes.risky.double().mean().item(),
                "mean_return": float(episodes.returns.mean()),
                **dual,
                **{name: float(value) for name, value in update.items()},
            }
            advance({k: metrics[k] for k in ("risky_fraction", "empirical_cvar", "lambda")})
    report = agent.policy_report()
    metrics["predicted_minus_exact_cvar"] = report["predicted_cvar"] - report["exact_cvar"]
    return agent, {**metrics, **report}


def main(argv: list[str] | None = None) -> None:
    parser = agent_parser(__doc__.splitlines()[0], VARIANTS, default_steps=Config.iterations)
    parser.add_argument(
        "--log-ratio-clamp", type=float, default=Config.log_ratio_clamp, help="+- bound on log r before exp (seed 001)"
    )
    parser.add_argument("--kl", choices=KL_ESTIMATORS, default=Config.kl_estimator, help="KL measure (seed 001)")
    parser.add_argument(
        "--adv-norm", choices=ADV_NORMS, default=Config.adv_norm, help="advantage normalisation (seed 001)"
    )
    parser.add_argument(
        "--target-kl", type=float, default=Config.target_kl, help="stop the update at KL > 1.5x this (seed 001)"
    )
    parser.add_argument(
        "--bc-coef", type=float, default=Config.bc_coef, help="initial BC weight towards the safe expert (seed 001)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = Config(
        variant=args.variant,
        iterations=args.steps,
        log_ratio_clamp=args.log_ratio_clamp,
        kl_estimator=args.kl,
        adv_norm=args.adv_norm,
        target_kl=args.target_kl,
        bc_coef=args.bc_coef,
    )
    _, metrics = train(cfg, args.seed, args.quiet)
    shown = [
        "risky_steps_per_episode",
        "exact_mean_return",
        "exact_cvar",
        "empirical_cvar",
        "predicted_cvar",
        "predicted_minus_exact_cvar",
        "lambda",
        "nu",
        "kl",
        "clip_fraction",
        "clamped_fraction",
        "masked",
        "optimizer_steps",
    ]
    if cfg.bc_coef:
        shown += ["bc_coef", "bc_ppo_grad_ratio"]
    print_metrics(f"distributional_ppo {cfg.variant}, seed {args.seed}", {k: metrics[k] for k in shown})


if __name__ == "__main__":
    main()
