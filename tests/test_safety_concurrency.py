"""Only the auditing process and thread are audited: forked workers and other threads run on untouched."""

import multiprocessing
import threading

import torch
from torch import nn

from gradaudit.capture import Audit

_WORKER_STEPS = 40
_BACKWARD = torch.autograd.backward


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, done: list[int] | None = None) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if done is not None:
            done[0] += 1


def _hogwild_worker(model: nn.Module, finished: "multiprocessing.Value", unpatched: "multiprocessing.Value") -> None:
    torch.set_num_threads(1)
    unpatched.value = int(torch.autograd.backward is _BACKWARD)
    done = [0]
    _train(model, torch.optim.SGD(model.parameters(), lr=1e-3), _WORKER_STEPS, done)
    finished.value = done[0]


def test_forked_hogwild_workers_run_every_step_unaudited():
    context = multiprocessing.get_context("fork")
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    model.share_memory()
    results = [(context.Value("i", -1), context.Value("i", -1)) for _ in range(2)]
    audit = Audit(iterations=2)
    with audit:
        workers = [context.Process(target=_hogwild_worker, args=(model, *result)) for result in results]
        for worker in workers:
            worker.start()
        _train(model, torch.optim.SGD(model.parameters(), lr=1e-3), 100)
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert [finished.value for finished, _ in results] == [_WORKER_STEPS] * 2
    assert [unpatched.value for _, unpatched in results] == [1, 1]
    assert audit.recorder.stopped_by == "iterations"


def test_a_training_thread_is_never_stopped_and_its_parameters_are_not_reported():
    torch.manual_seed(0)
    main_model, thread_model = nn.Linear(4, 1), nn.Linear(4, 1)
    done, failures, first_step = [0], [], threading.Event()

    def train_in_thread(optimizer: torch.optim.Optimizer) -> None:
        try:
            _train(thread_model, optimizer, 1, done)
            first_step.set()
            _train(thread_model, optimizer, 199, done)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            failures.append(exc)
        first_step.set()

    audit = Audit(iterations=3)
    with audit:  # both optimizers are made by the audited thread: the thread's one only steps elsewhere
        main_optimizer = torch.optim.SGD(main_model.parameters(), lr=1e-3)
        thread = threading.Thread(target=train_in_thread, args=(torch.optim.SGD(thread_model.parameters(), lr=1e-3),))
        thread.start()
        first_step.wait()
        _train(main_model, main_optimizer, 1000)
    thread.join()
    assert failures == [] and done == [200]
    assert audit.recorder.stopped_by == "iterations"
    assert [o.steps for o in audit.trace.optimizers] == [3, 0]
    assert audit.findings == []


def test_a_gradient_left_by_another_threads_backward_counts_as_received():
    """The main thread steps one optimizer over both heads; the second head's loss is backpropagated in a thread."""
    torch.manual_seed(0)
    head, side_head = nn.Linear(4, 1), nn.Linear(4, 1)
    optimizer = torch.optim.SGD([*head.parameters(), *side_head.parameters()], lr=1e-3)
    audit = Audit(iterations=3)
    with audit:
        for _ in range(10):
            optimizer.zero_grad()
            head(torch.randn(8, 4)).pow(2).mean().backward()
            side = threading.Thread(target=lambda: side_head(torch.randn(8, 4)).pow(2).mean().backward())
            side.start()
            side.join()
            optimizer.step()
    assert audit.recorder.foreign_backwards >= 3
    assert [f.rule for f in audit.findings] == []
    received = {e.param for e in audit.trace.events if e.kind == "accumulate" and e.by}
    assert received == {"side_head.weight", "side_head.bias"}
