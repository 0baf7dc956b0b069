"""Names a user would type: attribute paths to modules and optimizers, and locations inside installed packages."""

import os
import shutil
import sys
import sysconfig
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from gradaudit.capture.names import attribute_path, attribute_paths
from gradaudit.capture.source import _display_path
from tests.conftest import FIXTURES, fixture_line

MINIRL = "site-packages/minirl/__init__.py"
MINIRL_GROUPS = {
    "policy.mlp_extractor",
    "policy.action_net",
    "policy.value_net",
    "policy.critics.0",
    "policy.critics.1",
}


def name_here(obj: object) -> str | None:
    """The name of `obj` seen from the caller's frame, looking outward no further than the test function."""
    frame = test = sys._getframe(1)
    while not test.f_code.co_name.startswith("test_"):
        test = test.f_back
    return attribute_path(obj, frame, {id(test)})


def names_here(objs: list[object]) -> list[str | None]:
    """`name_here` of each object, from one search per frame."""
    frame = test = sys._getframe(1)
    while not test.f_code.co_name.startswith("test_"):
        test = test.f_back
    return attribute_paths(objs, frame, {id(test)})


class Agent:
    def __init__(self) -> None:
        self.critic = nn.Linear(2, 1)
        self.critics = [nn.Linear(2, 1), nn.Linear(2, 1)]
        self._optim = torch.optim.SGD(self.critic.parameters(), lr=0.1)
        self._hidden = torch.optim.SGD(self.critics[0].parameters(), lr=0.1)
        self.optim = self._optim

    def name_of(self, pick: Callable[[Any], object]) -> str | None:
        return name_here(pick(self))


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2, 2), nn.Tanh())

    def name_of(self, pick: Callable[[Any], object]) -> str | None:
        return name_here(pick(self))


class Watchful:
    """Runs code on attribute access: the search for names must never trigger it."""

    touched = 0

    def __getattr__(self, name: str) -> object:
        Watchful.touched += 1
        raise AttributeError(name)

    @property
    def loud(self) -> object:
        Watchful.touched += 1
        raise RuntimeError("a property ran")


def test_a_variable_names_its_object():
    critic = nn.Linear(2, 1)
    nets = {"actor": nn.Linear(2, 1)}
    assert name_here(critic) == "critic"
    assert name_here(nets["actor"]) == "nets['actor']"
    assert name_here(nn.Linear(2, 1)) is None


def test_in_a_method_of_a_plain_object_the_attribute_names_it_and_public_paths_win():
    agent = Agent()
    assert agent.name_of(lambda a: a.critic) == "critic"
    assert agent.name_of(lambda a: a.critics[1]) == "critics[1]"
    assert agent.name_of(lambda a: a._optim) == "optim"
    assert agent.name_of(lambda a: a._hidden) == "_hidden"


def test_in_a_method_of_a_module_the_module_is_named_from_outside():
    policy = Policy()
    assert policy.name_of(lambda p: p.encoder) == "policy.encoder"
    assert policy.name_of(lambda p: p.encoder[0]) == "policy.encoder.0"


def test_looking_for_names_runs_no_code_of_the_objects_it_reads():
    watchful = Watchful()
    watchful.head = nn.Linear(2, 1)
    assert name_here(watchful.head) == "watchful.head"
    assert Watchful.touched == 0


def minirl_names(result) -> tuple[list[str], set[str], set[str]]:
    report = result.report
    return (
        [o["name"] for o in report["optimizers"]],
        {g["group"] for g in report["groups"]},
        {t["name"] for t in report["terms"]},
    )


@pytest.fixture
def fresh_minirl(monkeypatch):
    """minirl imported anew by the program (the installed copy or the user's own)."""
    monkeypatch.delitem(sys.modules, "minirl", raising=False)
    yield
    sys.modules.pop("minirl", None)


def test_an_installed_library_s_objects_are_named_by_the_paths_a_user_types(gradaudit_cli, fresh_minirl):
    """minirl holds `self.optimizer` in its policy and steps it as `self.policy.optimizer` inside `train()`."""
    result = gradaudit_cli("run", "minirl_ppo.py", "--", "--orphan-value-net")
    optimizers, groups, terms = minirl_names(result)
    assert optimizers == ["policy.optimizer"]
    assert groups == MINIRL_GROUPS
    assert terms == {"policy_loss", "self.vf_coef * value_loss"}
    (finding,) = result.findings("GA201")
    assert finding["subject"] == "policy.value_net"
    assert "policy.value_net (2 tensors: policy.value_net.weight, policy.value_net.bias)" in finding["message"]
    assert finding["location"] == {"file": "minirl/__init__.py", "line": fixture_line(MINIRL, "backward")}
    assert result.report["optimizers"][0]["created_at"] == {
        "file": "minirl/__init__.py",
        "line": fixture_line(MINIRL, "optimizer"),
    }
    assert "minirl/__init__.py:" in result.output and "site-packages" not in result.output


def test_the_same_code_in_the_user_s_own_files_gets_the_same_names(gradaudit_cli, tmp_path, fresh_minirl):
    shutil.copytree(FIXTURES / "site-packages" / "minirl", tmp_path / "minirl")
    script = tmp_path / "train.py"
    script.write_text("from minirl import PPO\n\nPPO(orphan_value_net=True).learn(4)\n")
    result = gradaudit_cli("run", str(script))
    optimizers, groups, _ = minirl_names(result)
    assert optimizers == ["policy.optimizer"]
    assert {"policy.mlp_extractor", "policy.action_net", "policy.value_net"} <= groups
    (finding,) = result.findings("GA201")
    assert finding["subject"] == "policy.value_net"
    assert finding["location"]["file"] == str(tmp_path / "minirl" / "__init__.py")


def test_locations_are_shown_inside_their_package_or_relative_to_the_working_directory(tmp_path):
    site_packages = sysconfig.get_paths()["purelib"]
    installed = os.path.join(site_packages, "stable_baselines3", "ppo", "ppo.py")
    assert _display_path(installed, str(tmp_path)) == "stable_baselines3/ppo/ppo.py"
    assert _display_path(installed, os.path.dirname(site_packages)) == "stable_baselines3/ppo/ppo.py"
    assert _display_path(str(tmp_path / "src" / "train.py"), str(tmp_path)) == "src/train.py"
    assert _display_path("/elsewhere/train.py", str(tmp_path)) == "/elsewhere/train.py"


class Trainer:
    """A plain object holding a policy: in its methods, `self`'s attributes name things."""

    def __init__(self, policy: Policy, loose: torch.Tensor) -> None:
        self.policy, self.loose = policy, loose

    def names(self) -> tuple[list[str | None], list[str | None]]:
        together = names_here([self.policy.encoder[0].bias, self.loose, torch.zeros(1)])
        return together, [name_here(self.policy.encoder[0].bias), name_here(self.loose), name_here(torch.zeros(1))]


def test_many_objects_named_in_one_search_are_named_as_each_alone():
    agent, policy, loose = Agent(), Policy(), torch.zeros(3)
    together = names_here([agent.critic.weight, agent.critics[1].bias, policy.encoder[0].weight, loose])
    alone = [name_here(agent.critic.weight), name_here(agent.critics[1].bias), name_here(policy.encoder[0].weight)]
    alone.append(name_here(loose))
    assert together == alone == ["agent.critic.weight", "agent.critics[1].bias", "policy.encoder.0.weight", "loose"]
    together, alone = Trainer(policy, loose).names()
    assert together == alone == ["policy.encoder.0.bias", "loose", None]
