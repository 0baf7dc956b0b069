"""Multimodal LAPO (Latent-Variable Advantage-Weighted Policy Optimization) on pixel Pendulum data.

LAPO (Chen et al., NeurIPS 2022; pcchenxi/LAPO-offlienRL `algos/algos_vae.py`) is offline RL for
heterogeneous data. A CVAE (`actor_vae`) models the behaviour actions, weighted towards the actions with
positive advantage (expectile-style weights omega / 1 - omega), and a latent policy (`actor`) picks the latent
z that the target decoder turns into the action with the highest Q. Twin critics plus a V head (`critic`) supply
the values: y_Q = r + gamma (1 - d) sg(V(s')), y_V = sg(Q~(s, dec'(s, pi'(s) + clipped noise))) with
Q~ = zeta min(Q1', Q2') + (1 - zeta) max(Q1', Q2'), and A = r + gamma (1 - d) Q~(s', pi~(s')) - V(s).

The multimodal variant (the seed's `MultimodalLatent`) puts an observation encoder phi (`obs_encoder`) in
front: here a tiny CNN on a rendered 1x16x16 rod image plus an MLP on [theta_dot / 8], fused into one feature
vector (no BatchNorm, so Polyak averaging of parameters is the whole target update). Next observations are
encoded by the Polyak target phi'. Data: PendulumPixels-Offline, half expert pi_0 with N(0, 0.2^2) torque
noise, half a "spinner" u = 2 sign(theta_dot) that pumps energy forever.

Variants (seed 002, the Chinese note on the multimodal LAPO optimizer layout):
  fixed             phi in the critic optimizer (second param group); actor-VAE and actor see features.detach().
  encoder-in-actor  the original bug: phi in the actor-VAE optimizer. The critic backward fills phi.grad,
                    the critic step ignores it, the actor-VAE zero_grad wipes it; the VAE loss on non-detached
                    features becomes phi's only signal (action reconstruction instead of value).
  encoder-orphan    phi in no optimizer: the critic loss still reaches it, nothing ever applies the gradient.

Expected gradient-flow facts of `fixed` (what an auditor must find and nothing else):
  - critic_optimizer owns critic (Q1, Q2, V) and obs_encoder (two param groups); actor_vae_optimizer owns
    actor_vae (encoder and decoder); actor_optimizer owns actor. No parameter has two owners.
  - The critic loss reaches critic and obs_encoder. The VAE and actor losses use features.detach(): they never
    reach obs_encoder.
  - y_Q, y_V and the advantage weights are computed under torch.no_grad(); targets carry no gradient.
  - Target networks (critic, actor, actor_vae, obs_encoder) are frozen (requires_grad False), in no optimizer,
    and change only by Polyak averaging after the three steps. The actor loss runs through the frozen target
    decoder (gradient flows through it to the latent action, never into its parameters).
  - The actor loss goes through critic.q1 and fills the critic's .grad; critic_optimizer.zero_grad() wipes it
    before the next critic backward (intended, as in the original).
  - Update order: critic (zero_grad, backward, step), actor-VAE (same), actor (same), then Polyak.
  - No gradient clipping anywhere (the original has none).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_agents.common.cli import agent_parser, seed_everything
from reference_agents.common.nets import mlp, polyak_update
from reference_agents.common.offline import collect_pendulum
from reference_agents.common.pendulum import MAX_TORQUE, expert_torque, make_pendulum, pendulum_state, render_rod
from reference_agents.common.progress import print_metrics, training_progress

VARIANTS = {
    "fixed": "encoder in the critic optimizer, VAE/actor on detached features (seed 002, the fix)",
    "encoder-in-actor": "encoder in the actor-VAE optimizer, critic gradient wiped (seed 002, the bug)",
    "encoder-orphan": "encoder in no optimizer, critic gradient never applied (seed 002, its neighbour)",
}

VELOCITY_SCALE = 8.0
"""Pendulum-v1's max speed: the proprioceptive input is theta_dot / 8, in [-1, 1]."""


@dataclass
class LapoConfig:
    variant: str = "fixed"
    """Which optimizer owns the observation encoder (see VARIANTS)."""
    episodes_per_behaviour: int = 25
    """Offline episodes from each behaviour policy (expert, spinner); 200 steps each."""
    episode_steps: int = 200
    """Steps per offline episode (Pendulum-v1's time limit)."""
    expert_noise: float = 0.2
    """Std of the Gaussian torque noise added to the expert pi_0."""
    batch_size: int = 256
    """Minibatch size (the original uses 512 on D4RL)."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critic and, in `fixed`, of the encoder group (original 2e-4)."""
    vae_lr: float = 3e-4
    """Adam learning rate of the actor-VAE (original 2e-4)."""
    actor_lr: float = 3e-4
    """Adam learning rate of the latent policy (original 2e-4)."""
    gamma: float = 0.99
    """Discount."""
    tau: float = 0.005
    """Polyak rate of all four target networks."""
    expectile: float = 0.9
    """omega: weight of samples with A > 0; the others get 1 - omega."""
    kl_beta: float = 1.0
    """Weight of the KL term of the CVAE loss."""
    max_latent_action: float = 2.0
    """z_max: the latent policy outputs z_max * tanh(.)."""
    doubleq_min: float = 1.0
    """zeta in Q~ = zeta min(Q1', Q2') + (1 - zeta) max(Q1', Q2')."""
    target_noise: float = 0.1
    """Std of the latent smoothing noise in the y_V target."""
    target_noise_clip: float = 0.2
    """Clip of that noise."""
    image_size: int = 16
    """Side of the rendered rod image."""
    feature_dim: int = 64
    """Width of the fused observation feature f = phi(o)."""
    hidden: tuple[int, ...] = field(default=(128, 128))
    """Hidden layers of every MLP head (the original uses 3 x 256)."""
    eval_episodes: int = 5
    """Pendulum-v1 episodes that score the final policy."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {list(VARIANTS)}")


# ---------------------------------------------------------------------------------------------------------
# Data: PendulumPixels-Offline
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PixelTransitions:
    """Pixel transitions; actions are standardised and rewards scaled to [-1, 0] as in LAPO's D4RL script."""

    image: np.ndarray
    velocity: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_image: np.ndarray
    next_velocity: np.ndarray
    terminal: np.ndarray
    action_mean: float
    action_std: float
    reward_scale: float

    def __len__(self) -> int:
        return len(self.reward)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, Tensor]:
        return self.batch(rng.integers(0, len(self), size=batch_size))

    def batch(self, idx: np.ndarray | slice) -> dict[str, Tensor]:
        names = ("image", "velocity", "action", "reward", "next_image", "next_velocity", "terminal")
        return {k: torch.as_tensor(getattr(self, k)[idx], dtype=torch.get_default_dtype()) for k in names}


def spinner_torque(theta: float, theta_dot: float, rng: np.random.Generator) -> float:
    """Full torque along the motion: pumps energy and never balances."""
    return MAX_TORQUE * float(np.sign(theta_dot))


def collect_pixel_pendulum(
    cfg: LapoConfig, rng: np.random.Generator, like: PixelTransitions | None = None
) -> PixelTransitions:
    """Half noisy expert, half spinner; `like` reuses another set's normalisation (for held-out data)."""

    def noisy_expert(theta: float, theta_dot: float, rng: np.random.Generator) -> float:
        return expert_torque(theta, theta_dot) + cfg.expert_noise * rng.standard_normal()

    raw = collect_pendulum([noisy_expert, spinner_torque], cfg.episodes_per_behaviour, cfg.episode_steps, rng)
    action_mean = float(raw.action.mean()) if like is None else like.action_mean
    action_std = float(raw.action.std()) if like is None else like.action_std
    reward_scale = float(np.abs(raw.reward).max()) if like is None else like.reward_scale
    return PixelTransitions(
        image=render_rod(raw.state[:, 0], cfg.image_size),
        velocity=raw.state[:, 1:] / VELOCITY_SCALE,
        action=(raw.action - action_mean) / action_std,
        reward=raw.reward[:, None] / reward_scale,
        next_image=render_rod(raw.next_state[:, 0], cfg.image_size),
        next_velocity=raw.next_state[:, 1:] / VELOCITY_SCALE,
        # Pendulum-v1 never terminates: the collector's `done` marks time-limit truncation, which bootstraps.
        terminal=np.zeros_like(raw.reward[:, None]),
        action_mean=action_mean,
        action_std=action_std,
        reward_scale=reward_scale,
    )


# ---------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------


class ObsEncoder(nn.Module):
    """phi(o): a tiny CNN on the rod image and an MLP on the velocity, fused into one feature vector."""

    def __init__(self, image_size: int, feature_dim: int):
        super().__init__()
        self.image_branch = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * (image_size // 4) ** 2, feature_dim),
            nn.ReLU(),
        )
        self.velocity_branch = nn.Sequential(nn.Linear(1, 16), nn.ReLU())
        self.fusion = nn.Sequential(nn.Linear(feature_dim + 16, feature_dim), nn.ReLU())

    def forward(self, image: Tensor, velocity: Tensor) -> Tensor:
        return self.fusion(torch.cat([self.image_branch(image), self.velocity_branch(velocity)], dim=-1))


class Critic(nn.Module):
    """Twin Q(f, a) and a state value V(f), one module and one optimizer as in the original."""

    def __init__(self, feature_dim: int, action_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.q1_net = mlp(feature_dim + action_dim, 1, hidden, nn.ReLU)
        self.q2_net = mlp(feature_dim + action_dim, 1, hidden, nn.ReLU)
        self.v_net = mlp(feature_dim, 1, hidden, nn.ReLU)

    def forward(self, features: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([features, action], dim=-1)
        return self.q1_net(x), self.q2_net(x)

    def q1(self, features: Tensor, action: Tensor) -> Tensor:
        return self.q1_net(torch.cat([features, action], dim=-1))

    def v(self, features: Tensor) -> Tensor:
        return self.v_net(features)


class ActorVAE(nn.Module):
    """CVAE over behaviour actions: q(z | f, a) and dec(f, z); the decoder output is linear."""

    def __init__(self, feature_dim: int, action_dim: int, latent_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.encoder = mlp(feature_dim + action_dim, 2 * latent_dim, hidden, nn.ReLU)
        self.decoder = mlp(feature_dim + latent_dim, action_dim, hidden, nn.ReLU)

    def forward(self, features: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction, mean and log-variance of q(z | f, a), with a reparameterised sample."""
        mean, log_var = self.encoder(torch.cat([features, action], dim=-1)).chunk(2, dim=-1)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        return self.decode(features, z), mean, log_var

    def decode(self, features: Tensor, z: Tensor) -> Tensor:
        return self.decoder(torch.cat([features, z], dim=-1))


class LatentActor(nn.Module):
    """pi(f) = z_max tanh(g(f)): a latent action for the decoder."""

    def __init__(self, feature_dim: int, latent_dim: int, hidden: tuple[int, ...], max_latent_action: float):
        super().__init__()
        self.net = mlp(feature_dim, latent_dim, hidden, nn.ReLU)
        self.max_latent_action = max_latent_action

    def forward(self, features: Tensor) -> Tensor:
        return self.max_latent_action * torch.tanh(self.net(features))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A target network: same weights, no gradient of its own, moved only by Polyak averaging."""
    return copy.deepcopy(module).requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------------------------------------


class Lapo:
    """The four networks, their targets and the three optimizers laid out as the variant says."""

    def __init__(self, cfg: LapoConfig, value_range: tuple[float, float], action_dim: int = 1):
        self.cfg = cfg
        self.v_min, self.v_max = value_range
        latent_dim = 2 * action_dim
        self.obs_encoder = ObsEncoder(cfg.image_size, cfg.feature_dim)
        self.critic = Critic(cfg.feature_dim, action_dim, cfg.hidden)
        self.actor_vae = ActorVAE(cfg.feature_dim, action_dim, latent_dim, cfg.hidden)
        self.actor = LatentActor(cfg.feature_dim, latent_dim, cfg.hidden, cfg.max_latent_action)
        self.obs_encoder_target = frozen_copy(self.obs_encoder)
        self.critic_target = frozen_copy(self.critic)
        self.actor_vae_target = frozen_copy(self.actor_vae)
        self.actor_target = frozen_copy(self.actor)

        critic_groups = [{"params": self.critic.parameters()}]
        vae_groups = [{"params": self.actor_vae.parameters()}]
        if cfg.variant == "fixed":
            critic_groups.append({"params": self.obs_encoder.parameters()})
        elif cfg.variant == "encoder-in-actor":
            vae_groups.append({"params": self.obs_encoder.parameters()})
        self.critic_optimizer = torch.optim.Adam(critic_groups, lr=cfg.critic_lr)
        self.actor_vae_optimizer = torch.optim.Adam(vae_groups, lr=cfg.vae_lr)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)

    def target_q(self, features: Tensor, smoothing_noise: bool) -> Tensor:
        """Q~(f, dec'(f, pi'(f) [+ clipped noise])) from the target networks."""
        latent = self.actor_target(features)
        if smoothing_noise:
            noise = torch.randn_like(latent) * self.cfg.target_noise
            latent = latent + noise.clamp(-self.cfg.target_noise_clip, self.cfg.target_noise_clip)
        q1, q2 = self.critic_target(features, self.actor_vae_target.decode(features, latent))
        zeta = self.cfg.doubleq_min
        return zeta * torch.min(q1, q2) + (1 - zeta) * torch.max(q1, q2)

    @torch.no_grad()
    def next_features(self, batch: dict[str, Tensor]) -> Tensor:
        """sg(phi'(o')): next observations go through the target encoder."""
        return self.obs_encoder_target(batch["next_image"], batch["next_velocity"])

    @torch.no_grad()
    def value_targets(self, batch: dict[str, Tensor], features: Tensor) -> tuple[Tensor, Tensor]:
        """y_Q = r + gamma (1 - d) V(f') with the online V head; y_V = clip(Q~(f, noisy pi~(f)))."""
        not_done = 1 - batch["terminal"]
        y_q = batch["reward"] + self.cfg.gamma * not_done * self.critic.v(self.next_features(batch))
        y_v = self.target_q(features.detach(), smoothing_noise=True).clamp(self.v_min, self.v_max)
        return y_q, y_v

    @torch.no_grad()
    def advantage_weights(self, batch: dict[str, Tensor], features: Tensor) -> tuple[Tensor, Tensor]:
        """A = r + gamma (1 - d) Q~(f', pi~(f')) - V(f) with the V head just updated; w = omega if A > 0."""
        not_done = 1 - batch["terminal"]
        next_q = self.target_q(self.next_features(batch), smoothing_noise=False)
        advantage = batch["reward"] + self.cfg.gamma * not_done * next_q - self.critic.v(features.detach())
        return advantage, torch.where(advantage > 0, self.cfg.expectile, 1 - self.cfg.expectile)

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One LAPO iteration: critic, actor-VAE, latent actor, then Polyak averaging."""
        cfg = self.cfg
        features = self.obs_encoder(batch["image"], batch["velocity"])

        # ---- critic loss: the only loss meant to shape the encoder (features are not detached) ----
        y_q, y_v = self.value_targets(batch, features)
        q1, q2 = self.critic(features, batch["action"])
        critic_loss = F.mse_loss(q1, y_q) + F.mse_loss(q2, y_q) + F.mse_loss(self.critic.v(features), y_v)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()

        # ---- advantage-weighted CVAE loss ----
        advantage, weights = self.advantage_weights(batch, features)
        # The seed's bug trains the encoder through the VAE: re-encode (the critic graph is freed).
        vae_features = (
            self.obs_encoder(batch["image"], batch["velocity"])
            if cfg.variant == "encoder-in-actor"
            else features.detach()
        )
        reconstruction, mean, log_var = self.actor_vae(vae_features, batch["action"])
        reconstruction_error = (reconstruction - batch["action"]).pow(2).sum(dim=-1, keepdim=True)
        kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(dim=-1, keepdim=True)
        vae_loss = (weights * (reconstruction_error + cfg.kl_beta * kl)).mean()
        self.actor_vae_optimizer.zero_grad()
        vae_loss.backward()
        self.actor_vae_optimizer.step()

        # ---- latent policy loss: through the frozen target decoder and the online Q1 ----
        policy_features = features.detach()
        action = self.actor_vae_target.decode(policy_features, self.actor(policy_features))
        actor_loss = -self.critic.q1(policy_features, action).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()

        for target, online in (
            (self.critic_target, self.critic),
            (self.actor_target, self.actor),
            (self.actor_vae_target, self.actor_vae),
            (self.obs_encoder_target, self.obs_encoder),
        ):
            polyak_update(target, online, cfg.tau)

        return {
            "critic_loss": critic_loss.detach(),
            "vae_loss": vae_loss.detach(),
            "actor_loss": actor_loss.detach(),
            "advantage_positive_fraction": (advantage > 0).float().mean(),
            "weight_omega_fraction": (weights == cfg.expectile).float().mean(),
        }

    @torch.no_grad()
    def act(self, image: Tensor, velocity: Tensor) -> Tensor:
        """a = dec'(f, pi(f)) in standardised action units."""
        features = self.obs_encoder(image, velocity)
        return self.actor_vae_target.decode(features, self.actor(features))

    @torch.no_grad()
    def td_error(self, batch: dict[str, Tensor]) -> float:
        """Mean squared Q1 - y_Q on a batch (held-out data measures how well phi serves the critic)."""
        features = self.obs_encoder(batch["image"], batch["velocity"])
        y_q, _ = self.value_targets(batch, features)
        return F.mse_loss(self.critic.q1(features, batch["action"]), y_q).item()


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------


def value_range(data: PixelTransitions, gamma: float) -> tuple[float, float]:
    """v_min, v_max = r_min / (1 - gamma), r_max / (1 - gamma), as in LAPO's D4RL script."""
    return float(data.reward.min()) / (1 - gamma), float(data.reward.max()) / (1 - gamma)


def evaluate(agent: Lapo, data: PixelTransitions, episodes: int, seed: int) -> float:
    """Mean undiscounted Pendulum-v1 return of dec'(f, pi(f)) from the env's random starts."""
    env, dtype = make_pendulum(seed), torch.get_default_dtype()
    returns = []
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        total = 0.0
        for _ in range(env.spec.max_episode_steps):
            theta, theta_dot = pendulum_state(env)
            image = torch.as_tensor(render_rod(np.array([theta]), agent.cfg.image_size), dtype=dtype)
            velocity = torch.tensor([[theta_dot / VELOCITY_SCALE]], dtype=dtype)
            action = agent.act(image, velocity).item() * data.action_std + data.action_mean
            _, reward, _, _, _ = env.step(np.array([np.clip(action, -MAX_TORQUE, MAX_TORQUE)], dtype=np.float32))
            total += float(reward)
        returns.append(total)
    return float(np.mean(returns))


def behaviour_returns(data: PixelTransitions, episode_steps: int) -> tuple[float, float]:
    """Mean episode return of the expert half and the spinner half of the data set (unscaled)."""
    per_episode = data.reward.reshape(-1, episode_steps).sum(axis=1) * data.reward_scale
    half = len(per_episode) // 2
    return float(per_episode[:half].mean()), float(per_episode[half:].mean())


def train(cfg: LapoConfig, steps: int, seed: int, quiet: bool = False) -> dict[str, float]:
    """Collects the offline data, runs `steps` LAPO iterations and scores the result."""
    rng = seed_everything(seed)
    data = collect_pixel_pendulum(cfg, rng)
    held_out = collect_pixel_pendulum(replace(cfg, episodes_per_behaviour=2), rng, like=data)
    agent = Lapo(cfg, value_range(data, cfg.gamma))
    held_out_batch = held_out.batch(slice(None))
    initial_td_error = agent.td_error(held_out_batch)
    with training_progress(f"LAPO ({cfg.variant})", steps, quiet) as advance:
        for _ in range(steps):
            metrics = agent.update(data.sample(cfg.batch_size, rng))
            advance({k: metrics[k].item() for k in ("critic_loss", "vae_loss", "actor_loss")})
    expert_return, spinner_return = behaviour_returns(data, cfg.episode_steps)
    return {
        "critic_loss": metrics["critic_loss"].item(),
        "vae_loss": metrics["vae_loss"].item(),
        "held_out_td_error_at_start": initial_td_error,
        "held_out_td_error": agent.td_error(held_out_batch),
        "policy_return": evaluate(agent, data, cfg.eval_episodes, seed),
        "expert_data_return": expert_return,
        "spinner_data_return": spinner_return,
    }


def main() -> None:
    parser = agent_parser("Multimodal LAPO on PendulumPixels-Offline (seed 002).", VARIANTS, default_steps=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    metrics = train(LapoConfig(variant=args.variant), args.steps, args.seed, args.quiet)
    print_metrics(f"LAPO ({args.variant}) after {args.steps} iterations", metrics)


if __name__ == "__main__":
    main()
