"""The pytest plugin's `gradaudit` fixture, exercised in pytest runs of their own (pytester, in subprocesses:
in-process runs drop the torch modules they import, and torch cannot be imported twice)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TRAINING = """
import torch
from torch import nn

torch.manual_seed(0)
encoder, critic, head = nn.Linear(4, 8), nn.Linear(8, 1), nn.Linear(8, 1)
optimizer = torch.optim.SGD([*encoder.parameters(), *critic.parameters(), *HEAD], lr=1e-6)


def train():
    for _ in range(3):
        features = encoder(torch.randn(16, 4))
        critic_loss = critic(features).pow(2).mean() + head(features).pow(2).mean()
        optimizer.zero_grad()
        critic_loss.backward()
        optimizer.step()
"""


def write_training(pytester: pytest.Pytester, head_trained: bool) -> None:
    pytester.makepyfile(training=TRAINING.replace("*HEAD", "*head.parameters()" if head_trained else ""))


def test_assert_clean_passes_and_fails_like_the_console_report(pytester):
    write_training(pytester, head_trained=False)
    pytester.makepyfile(
        test_training="""
        from training import train

        def test_clean(gradaudit):
            with gradaudit:
                train()
            gradaudit.assert_clean()
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*gradaudit: 1 finding(s) at or above warning*", "*GA201*head*", "*no optimizer*"])


def test_assert_routes(pytester):
    write_training(pytester, head_trained=True)
    pytester.makepyfile(
        test_routes="""
        from training import train

        def test_reaches(gradaudit):
            with gradaudit:
                train()
            gradaudit.assert_clean()
            gradaudit.assert_routes("critic_loss", reaches=["encoder", "critic"])

        def test_avoids(gradaudit):
            with gradaudit:
                train()
            gradaudit.assert_routes("critic_loss", avoids=["encoder"])
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*the routes of `critic_loss` break the contract*", "*GA402*", "*encoder*"])


def test_assert_matches_baseline(pytester):
    write_training(pytester, head_trained=False)
    pytester.makepyfile(
        test_baseline="""
        from training import train

        def test_baseline(gradaudit):
            with gradaudit:
                train()
            gradaudit.assert_matches_baseline("baseline.json")
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(failed=1)  # no baseline yet: says how to write one
    pytester.runpytest_subprocess("--gradaudit-update-baseline").assert_outcomes(passed=1)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)  # the GA201 is known
    pytester.path.joinpath("training.py").write_text(
        pytester.path.joinpath("training.py")
        .read_text()
        .replace("encoder(torch.randn(16, 4))", "encoder(torch.randn(16, 4)).detach()")
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*new finding(s) against baseline.json*", "*GA207*encoder*", "*+ GA207 group-lost-gradient encoder*"]
    )
