"""gradaudit never changes what it observes, and leaves nothing installed."""

import copy
import sys
import weakref

import torch
import torch.optim.optimizer as optimizer_module
from torch import nn
from torch.nn.modules import module as module_module

import gradaudit
from gradaudit.capture.tensormap import TensorMap


def _train(model: nn.Module, steps: int = 4) -> None:
    torch.manual_seed(1)
    critic = nn.Linear(3, 1)
    optimizer = torch.optim.Adam([*model.parameters(), *critic.parameters()], lr=1e-2)
    for _ in range(steps):
        features = model(torch.randn(16, 4))
        loss = critic(features).pow(2).mean() + 0.1 * features.abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_audited_training_is_bit_identical():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    audited = copy.deepcopy(plain)
    _train(plain)
    with gradaudit.audit():
        _train(audited)
    for a, b in zip(plain.parameters(), audited.parameters(), strict=True):
        assert torch.equal(a, b)


def test_nothing_remains_installed():
    originals = (torch.autograd.backward, torch.autograd.grad, torch.Tensor.backward, torch.optim.Optimizer.zero_grad)
    init = torch.optim.Optimizer.__init__
    with gradaudit.audit():
        _train(nn.Linear(4, 3))
        assert torch.autograd.backward is not originals[0]
    assert (
        torch.autograd.backward,
        torch.autograd.grad,
        torch.Tensor.backward,
        torch.optim.Optimizer.zero_grad,
    ) == originals
    assert torch.optim.Optimizer.__init__ is init
    assert not module_module._global_forward_pre_hooks and not module_module._global_forward_hooks
    assert not optimizer_module._global_optimizer_pre_hooks and not optimizer_module._global_optimizer_post_hooks
    assert not torch.overrides._get_current_function_mode_stack()


def test_nothing_remains_after_the_program_raises():
    try:
        with gradaudit.audit():
            raise KeyError("boom")
    except KeyError:
        pass
    assert not module_module._global_forward_pre_hooks
    assert not torch.overrides._get_current_function_mode_stack()


def test_importing_gradaudit_patches_nothing():
    import subprocess
    import sys

    code = "import torch; b = torch.autograd.backward; import gradaudit, gradaudit.cli; assert torch.autograd.backward is b"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


class _Velocity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t], dim=-1))


def _sample_and_step(velocity: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> torch.Tensor:
    """An unrolled sampler, a clamp, an exp and a log: every per-op and per-call measurement is exercised."""
    torch.manual_seed(2)
    for _ in range(steps):
        x = torch.randn(32, 2)
        for i in range(8):
            x = x + velocity(x, torch.full_like(x[:, :1], i / 8)) / 8
        loss = torch.exp(x.clamp(-1, 1)).mean() - torch.log(x.pow(2) + 1).mean()
        optimizer.zero_grad()
        loss.backward(retain_graph=True)
        optimizer.step()
    return loss


def test_chain_and_numerics_capture_is_bit_identical_and_unhooked():
    import gc

    from gradaudit.capture import chains

    torch.manual_seed(0)
    plain = _Velocity()
    audited = copy.deepcopy(plain)
    _sample_and_step(plain, torch.optim.Adam(plain.parameters(), lr=1e-2))
    with gradaudit.audit() as audit:
        retained = _sample_and_step(audited, torch.optim.Adam(audited.parameters(), lr=1e-2))
    assert audit.trace.chains and audit.trace.clamps and audit.trace.exps
    for a, b in zip(plain.parameters(), audited.parameters(), strict=True):
        assert torch.equal(a, b)
    gc.collect()
    assert retained.grad_fn is not None
    assert not [o for o in gc.get_objects() if type(o) is chains._Observed], "a node hook outlived the backward"


def test_after_the_audit_a_backward_runs_no_code_of_gradaudit():
    """The hooks on gradient accumulators outlive each backward within the audit, never the audit."""
    model = nn.Linear(4, 3)
    with gradaudit.audit():
        _train(model, steps=2)
    called = []

    def note(frame, event, arg):  # noqa: ANN001, ANN202 - sys.setprofile's signature
        if event == "call" and "gradaudit" in frame.f_code.co_filename:
            called.append(frame.f_code.co_name)

    sys.setprofile(note)
    try:
        model(torch.randn(2, 4)).sum().backward()
    finally:
        sys.setprofile(None)
    assert called == []


def test_a_mode_the_program_enters_during_the_audit_stays_above_gradaudits_through_its_quiet_reads():
    """gradaudit steps its mode off the stack for its own reads (zero_grad, backward): back in its place after."""
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradaudit.audit() as audit, torch.device("cpu"):
        for _ in range(2):
            loss = model(torch.randn(8, 4)).clamp(-0.1, 0.1).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            stack = torch.overrides._get_current_function_mode_stack()
            assert [type(mode).__name__ for mode in stack] == ["ProvenanceMode", "DeviceContext"]
    assert not torch.overrides._get_current_function_mode_stack()
    assert [(c.expression, c.backward) for c in audit.trace.clamps] == [
        ("model(torch.randn(8, 4)).clamp(-0.1, 0.1)", 0),
        ("model(torch.randn(8, 4)).clamp(-0.1, 0.1)", 1),
    ]


def test_what_is_recorded_per_tensor_keeps_no_tensor_alive_and_goes_with_it():
    recorded = TensorMap()
    tensor, other = torch.ones(3), torch.ones(3)
    freed = weakref.ref(tensor)
    recorded[tensor] = "detach at train.py:3"
    assert (recorded.get(tensor), tensor in recorded, other in recorded, len(recorded)) == (
        "detach at train.py:3",
        True,
        False,
        1,
    )
    del tensor
    assert freed() is None and len(recorded) == 0
