"""The observer-effect harness: every program in PROGRAMS runs plainly and audited, and must end in the same state.

Compared: parameters and buffers, whatever else the program returns (counters of user code, retained grads), the
torch / numpy / Python `random` RNG states, grad mode, the default dtype, the warnings (stderr) it printed and what
dynamo compiled. A program is either a function run in this process (`with gradaudit.audit()`), which builds its
models from a seed, trains a few steps and returns the tensors to compare, or a fixture script run in a child
process by `python` and by `gradaudit run`, which ends with `observed_state.dump(...)`. Adding a case is one entry.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.checkpoint as checkpoint
from torch import nn
from torch._dynamo.utils import counters

import gradaudit
from tests.conftest import FIXTURES

State = dict[str, torch.Tensor]


@dataclass
class Observed:
    state: State
    torch_rng: torch.Tensor
    numpy_rng: tuple
    python_rng: tuple
    grad_enabled: bool
    default_dtype: torch.dtype
    warnings: list[str] = field(default_factory=list)
    """Warning messages (in process) or stderr lines (child process)."""
    compiled: dict[str, int] = field(default_factory=dict)
    """Graphs dynamo compiled and graph breaks it took."""


@dataclass(frozen=True)
class InProcess:
    name: str
    run: Callable[[], State]
    """Builds from a fixed seed, trains, returns named tensors (parameters, buffers, counters) to compare."""

    def observe(self, audited: bool, scratch: Path) -> Observed:
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        counters.clear()
        audit = gradaudit.audit() if audited else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if audit is None:
                state = self.run()
            else:
                with audit:
                    state = self.run()
        if audit is not None:
            assert audit.recorder.internal_errors == 0
            assert audit.trace.backwards, "the audit saw no backward pass"
        return Observed(
            state,
            torch.get_rng_state(),
            np.random.get_state(),
            random.getstate(),
            torch.is_grad_enabled(),
            torch.get_default_dtype(),
            sorted({str(w.message) for w in caught}),
            {"graphs": counters["stats"]["unique_graphs"], "graph breaks": sum(counters["graph_break"].values())},
        )


@dataclass(frozen=True)
class Script:
    name: str
    script: str
    """A fixture script that ends with `observed_state.dump(...)`."""
    args: tuple[str, ...] = ()

    def observe(self, audited: bool, scratch: Path) -> Observed:
        path = scratch / f"{self.name}-{'audited' if audited else 'plain'}.pt"
        runner = [sys.executable, "-m", "gradaudit", "run", "-q", "-n", "100"] if audited else [sys.executable]
        command = [*runner, self.script, *(["--"] if audited and self.args else []), *self.args]
        env = {**os.environ, "GRADAUDIT_OBSERVED_STATE": str(path)}
        done = subprocess.run(command, cwd=FIXTURES, env=env, capture_output=True, text=True)
        assert path.exists(), f"{self.name} did not end normally: {done.stderr[-2000:]}"
        found = torch.load(path, weights_only=False)
        return Observed(
            found["state"],
            found["torch_rng"],
            found["numpy_rng"],
            found["python_rng"],
            found["grad_enabled"],
            found["default_dtype"],
            done.stderr.splitlines(),
        )


def _state(*modules: nn.Module, **extra: torch.Tensor) -> State:
    found = {
        f"{index}.{name}": t.detach().clone() for index, m in enumerate(modules) for name, t in m.state_dict().items()
    }
    return {**found, **{name: t.detach().clone() for name, t in extra.items()}}


def _steps(model: nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = loss_of(torch.randn(8, 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def gradient_noise_hooks() -> State:
    """Hooks that draw from the global RNG, on an activation and on a parameter; a two-term loss."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model[0].weight.register_hook(lambda g: g + 0.01 * torch.randn_like(g))

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        hidden = model[1](model[0](x))
        hidden.register_hook(lambda g: g + 0.01 * torch.randn_like(g))
        return model[2](hidden).pow(2).mean() + 0.1 * hidden.abs().mean()

    _steps(model, loss_of)
    return _state(model)


class _CountingScale(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        _CountingScale.calls += 1
        return grad * 2


def custom_function_counter() -> State:
    """A custom autograd.Function whose Python backward counts its calls."""
    _CountingScale.calls = 0
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        hidden = _CountingScale.apply(model[1](model[0](x)))
        return model[2](hidden).pow(2).mean() + 0.1 * hidden.abs().mean()

    _steps(model, loss_of)
    return _state(model, backward_calls=torch.tensor(_CountingScale.calls))


def _checkpointed(reentrant: bool) -> State:
    block = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Tanh())
    head = nn.Linear(8, 1)
    model = nn.ModuleList([block, head])
    embed = nn.Linear(4, 4)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        hidden = checkpoint.checkpoint(block, embed(x), use_reentrant=reentrant)
        return head(hidden).pow(2).mean() + 0.01 * hidden.pow(2).mean()

    _steps(nn.ModuleList([model, embed]), loss_of)
    return _state(model, embed)


def nonreentrant_checkpoint_batchnorm() -> State:
    """Recomputation in backward: BatchNorm running statistics and dropout masks must move exactly as without audit."""
    return _checkpointed(reentrant=False)


def reentrant_checkpoint() -> State:
    return _checkpointed(reentrant=True)


def retained_grad() -> State:
    """A retained non-leaf gradient is user-visible state: measuring a term must not add to it."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    retained: list[torch.Tensor] = []

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        hidden = model[1](model[0](x))
        hidden.retain_grad()
        retained.append(hidden)
        return model[2](hidden).pow(2).mean() + 0.1 * hidden.abs().mean()

    _steps(model, loss_of)
    return _state(model, **{f"retained{i}": t.grad for i, t in enumerate(retained)})


def compiled_aot_eager() -> State:
    """torch.compile: gradaudit steps aside while dynamo traces (no graph break, same numbers)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    compiled = torch.compile(model, backend="aot_eager")
    _steps(model, lambda x: compiled(x).pow(2).mean() + 0.1 * model[0].weight.abs().mean())
    return _state(model)


def compiled_module_and_loss() -> State:
    """`module.compile()` and a compiled loss: dynamo must not compile gradaudit's hooks as graphs of their own."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model.compile(backend="aot_eager")

    @torch.compile(backend="aot_eager")
    def loss_of(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out.pow(2).mean() + nn.functional.mse_loss(out, x[:, :1]) + 0.1 * out.clamp(-1, 1).exp().mean()

    _steps(model, lambda x: loss_of(model(x), x))
    return _state(model)


def sparse_embedding() -> State:
    """Sparse gradients (nn.Embedding(sparse=True) with SparseAdam) next to a dense head."""
    embedding, head = nn.Embedding(20, 4, sparse=True), nn.Linear(4, 1)
    sparse, dense = torch.optim.SparseAdam(embedding.parameters(), lr=0.05), torch.optim.SGD(head.parameters(), lr=0.05)
    for _ in range(3):
        loss = head(embedding(torch.randint(0, 20, (8,)))).pow(2).mean()
        sparse.zero_grad()
        dense.zero_grad()
        loss.backward()
        sparse.step()
        dense.step()
    return _state(embedding, head)


def _train_in_thread(model: nn.Module) -> None:
    import threading

    worker = threading.Thread(target=_steps, args=(model, lambda x: model(x).pow(2).mean(), 5))
    worker.start()
    worker.join()


def training_thread() -> State:
    """A second thread trains its own model while the auditing thread trains another: neither is altered."""
    main_model, thread_model = nn.Linear(4, 1), nn.Linear(4, 1)
    thread_rng = torch.Generator().manual_seed(1)
    thread_model.weight.data.copy_(torch.randn(1, 4, generator=thread_rng))
    _train_in_thread(thread_model)
    _steps(main_model, lambda x: main_model(x).pow(2).mean())
    return _state(main_model, thread_model)


def forked_worker() -> State:
    """A forked child trains a shared-memory model to its end (hogwild): the audit is not inherited by it."""
    import multiprocessing

    model = nn.Linear(4, 1)
    model.share_memory()
    child = multiprocessing.get_context("fork").Process(
        target=_steps, args=(model, lambda x: model(x).pow(2).mean(), 6)
    )
    child.start()
    child.join()
    assert child.exitcode == 0
    _steps(model, lambda x: model(x).pow(2).mean())
    return _state(model)


PROGRAMS: list[InProcess | Script] = [
    InProcess("gradient-noise-hooks", gradient_noise_hooks),
    InProcess("custom-function-counter", custom_function_counter),
    InProcess("nonreentrant-checkpoint-batchnorm", nonreentrant_checkpoint_batchnorm),
    InProcess("reentrant-checkpoint", reentrant_checkpoint),
    InProcess("retained-grad", retained_grad),
    InProcess("compile-aot-eager", compiled_aot_eager),
    InProcess("compile-module-and-loss-aot-eager", compiled_module_and_loss),
    InProcess("sparse-embedding", sparse_embedding),
    InProcess("training-thread", training_thread),
    InProcess("forked-worker", forked_worker),
    Script("cli-backward-code", "observed_training.py"),
]


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_audited_program_ends_in_the_plain_state(program: InProcess | Script, tmp_path: Path):
    plain, audited = program.observe(False, tmp_path), program.observe(True, tmp_path)
    assert audited.state.keys() == plain.state.keys()
    for name, value in plain.state.items():
        assert torch.equal(audited.state[name], value), f"{program.name}: {name} differs under audit"
    assert torch.equal(audited.torch_rng, plain.torch_rng), "torch RNG stream moved"
    assert audited.numpy_rng[0] == plain.numpy_rng[0] and np.array_equal(audited.numpy_rng[1], plain.numpy_rng[1])
    assert audited.python_rng == plain.python_rng
    assert (audited.grad_enabled, audited.default_dtype) == (plain.grad_enabled, plain.default_dtype)
    assert set(audited.warnings) <= set(plain.warnings), "the audit printed warnings the program does not"
    assert audited.compiled == plain.compiled
