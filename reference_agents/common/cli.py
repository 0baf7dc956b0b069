"""The command line every agent shares: --variant, --steps, --seed, plus agent-specific flags."""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch


def agent_parser(description: str, variants: dict[str, str], default_steps: int) -> argparse.ArgumentParser:
    """`variants` maps each variant name to its one-line help; the first one is the default."""
    variant_help = "\n".join(f"  {name:<18} {text}" for name, text in variants.items())
    parser = argparse.ArgumentParser(
        description=f"{description}\n\nvariants:\n{variant_help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--variant", choices=list(variants), default=next(iter(variants)))
    parser.add_argument("--steps", type=int, default=default_steps, help="training iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def seed_everything(seed: int) -> np.random.Generator:
    """Seeds python, numpy and torch; returns a numpy Generator for the agent's own sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
