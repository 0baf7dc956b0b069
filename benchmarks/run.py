"""Audit cost against the plain training step: `python benchmarks/run.py [--quick] [--only NAME] [--json PATH]`.

Every workload (benchmarks/workloads.py, benchmarks/agents.py) runs in one process under each mode, the modes
alternating round by round: plain, light (`gradaudit.audit(light=True)`), full (`gradaudit.audit()`),
`torch.autograd.detect_anomaly()`, and `torchviz.make_dot(loss).source` at each backward when torchviz is
installed. The audit is entered once per round (its install is timed on its own, in the install line). A round
times `--steps` steps after one untimed warm-up step; the table gives the median over `--rounds` rounds of each
mode's main-thread CPU time (`time.thread_time`, steady on a shared machine) and wall time, as ratios to plain.
Memory: the peak resident-set growth during one step, sampled every 0.2 ms, as a ratio to plain (the process
re-executes itself with MALLOC_MMAP_THRESHOLD_ set, so that freed tensors leave the resident set).
Denormals are flushed (`torch.set_flush_denormal(True)`); OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import workloads  # noqa: E402
from workloads import Step  # noqa: E402

import gradaudit  # noqa: E402
from gradaudit.capture.graph import walk  # noqa: E402

try:
    import torchviz
except ImportError:  # optional: the torchviz column is left out
    torchviz = None

_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class Workload:
    name: str
    make: Callable[[], Step]
    threads: int = 1
    memory: bool = False
    """Whether the step's peak is large enough (transformers) for its resident-set growth to mean anything: a small
    step reuses memory the allocator already holds, so its growth is a few pages and the ratio noise."""


@dataclass
class Result:
    name: str
    nodes: int
    plain_ms: float
    cpu: dict[str, float] = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    error: str = ""


def workloads_table(quick: bool) -> list[Workload]:
    if quick:
        return [
            Workload("transformer 2 layers d64", lambda: workloads.make_transformer(2, 64, 2, 16, 1000)),
            Workload("actor-critic MLP", workloads.make_actor_critic),
            Workload("flow sampler x4", lambda: workloads.make_flow_sampler(4)),
            Workload("LSTM x20", lambda: workloads.make_lstm(20)),
            Workload("wide graph 10k nodes", lambda: workloads.make_wide_graph(10_000)),
            Workload("100 tensors", lambda: workloads.make_many_tensors(100)),
            Workload("10 terms", lambda: workloads.make_many_terms(10)),
        ]
    from agents import AGENTS  # the reference agents collect data when built: only in full runs

    return [
        Workload("GPT-2-sized 12 layers d768", workloads.make_transformer, threads=2, memory=True),
        Workload("transformer 6 layers d512", lambda: workloads.make_transformer(6, 512), threads=2, memory=True),
        Workload("actor-critic MLP", workloads.make_actor_critic),
        Workload("flow sampler x20", workloads.make_flow_sampler),
        Workload("LSTM x200", workloads.make_lstm),
        *(Workload(name, make) for name, make in AGENTS.items()),
        *(
            Workload(f"wide graph {n // 1000}k nodes", lambda n=n: workloads.make_wide_graph(n))
            for n in (10_000, 100_000, 1_000_000)
        ),
        *(Workload(f"{n} tensors", lambda n=n: workloads.make_many_tensors(n)) for n in (100, 1_000, 10_000)),
        *(Workload(f"{n} terms", lambda n=n: workloads.make_many_terms(n)) for n in (1, 10, 100)),
    ]


@contextlib.contextmanager
def at_each_backward(inspect: Callable[[list[torch.Tensor]], None]) -> Iterator[None]:
    """Calls `inspect(roots)` before every `torch.autograd.backward` (what `Tensor.backward` calls)."""
    original = torch.autograd.backward

    def backward(tensors, *args, **kwargs):  # noqa: ANN001, ANN202 - mirrors torch's signature
        inspect([tensors] if isinstance(tensors, torch.Tensor) else list(tensors))
        return original(tensors, *args, **kwargs)

    torch.autograd.backward = backward
    try:
        yield
    finally:
        torch.autograd.backward = original


def render_with_torchviz(roots: list[torch.Tensor]) -> None:
    for root in roots:
        torchviz.make_dot(root).source  # noqa: B018 - building the source is the cost measured


@contextlib.contextmanager
def anomaly_detection() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.detect_anomaly(check_nan=True):
            yield


MODES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "plain": contextlib.nullcontext,
    "light": lambda: gradaudit.audit(light=True),
    "full": gradaudit.audit,
    "detect_anomaly": anomaly_detection,
}
if torchviz is not None:
    MODES["torchviz"] = lambda: at_each_backward(render_with_torchviz)


def count_nodes(step: Step) -> int:
    """Autograd nodes (AccumulateGrad included) behind the roots of the step's backward calls."""
    counted = 0

    def count(roots: list[torch.Tensor]) -> None:
        nonlocal counted
        counted += len(walk([r.grad_fn for r in roots], lambda _: False, {}).nodes)

    with at_each_backward(count):
        step()
    return counted


def timed(step: Step, steps: int) -> tuple[float, float]:
    """(CPU seconds of this thread, wall seconds) per step."""
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        step()
    return (time.thread_time() - cpu) / steps, (time.perf_counter() - wall) / steps


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(step: Step) -> int:
    """The most the resident set grew above its level at the start of one step."""
    start, peak, running = _resident_bytes(), 0, True

    def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, _resident_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step()
    finally:
        running = False
        sampler.join()
    return max(peak - start, 1)


def measure(workload: Workload, rounds: int, steps: int, modes: list[str]) -> Result:
    torch.set_num_threads(workload.threads)
    torch.manual_seed(0)
    step = workload.make()
    step()
    result = Result(workload.name, count_nodes(step), 0.0)
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    wall: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            with MODES[mode]():
                step()
                spent = timed(step, steps)
            cpu[mode].append(spent[0])
            wall[mode].append(spent[1])
    plain_cpu, plain_wall = statistics.median(cpu["plain"]), statistics.median(wall["plain"])
    result.plain_ms = plain_wall * 1e3
    result.cpu = {mode: statistics.median(cpu[mode]) / plain_cpu for mode in modes[1:]}
    result.wall = {mode: statistics.median(wall[mode]) / plain_wall for mode in modes[1:]}
    if workload.memory:
        grown = {}
        for mode in modes:
            with MODES[mode]():
                step()
                grown[mode] = peak_growth(step)
        result.memory = {mode: grown[mode] / grown["plain"] for mode in modes[1:]}
    return result


def install_ms(repeats: int = 20) -> tuple[float, float]:
    """(milliseconds to install the audit, milliseconds to uninstall it and build an empty report), medians."""
    installs, exits = [], []
    for _ in range(repeats):
        audit = gradaudit.audit()
        start = time.perf_counter()
        audit.__enter__()
        middle = time.perf_counter()
        audit.__exit__(None, None, None)
        installs.append(middle - start)
        exits.append(time.perf_counter() - middle)
    return statistics.median(installs) * 1e3, statistics.median(exits) * 1e3


def walk_rate(nodes: int) -> float:
    """Nodes per second of gradaudit's graph walk alone, on a wide graph of `nodes` nodes (best of 3)."""
    params = [torch.nn.Parameter(torch.ones(())) for _ in range(10)]
    loss = torch.stack([params[i % 10] * 2.0 for i in range(nodes)]).sum()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        walked = len(walk([loss.grad_fn], lambda t: isinstance(t, torch.nn.Parameter), {}).nodes)
        best = min(best, time.perf_counter() - start)
    return walked / best


def table(results: list[Result], modes: list[str]) -> str:
    audited = modes[1:]
    header = ["workload", "nodes", "plain ms", *(f"{m} cpu/wall" for m in audited), *(f"mem {m}" for m in audited)]
    rows = [header]
    for r in results:
        if r.error:
            rows.append([r.name, "-", "-", f"failed: {r.error}"])
            continue
        rows.append(
            [
                r.name,
                str(r.nodes),
                f"{r.plain_ms:.1f}",
                *(f"{r.cpu[m]:.2f}x / {r.wall[m]:.2f}x" for m in audited),
                *((f"{r.memory[m]:.2f}x" if r.memory else "-") for m in audited),
            ]
        )
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round: a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, help="rounds per mode (default 3; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--only", action="append", default=[], help="run the workloads whose name contains this")
    parser.add_argument("--skip", action="append", default=[], help="leave out the workloads whose name contains this")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if any(os.environ.get(name) != value for name, value in _ENVIRONMENT.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_ENVIRONMENT})
    torch.set_flush_denormal(True)
    rounds = args.rounds or (1 if args.quick else 3)
    modes = list(MODES)
    chosen = [
        w
        for w in workloads_table(args.quick)
        if (not args.only or any(o in w.name for o in args.only)) and not any(s in w.name for s in args.skip)
    ]
    installed, exited = install_ms(3 if args.quick else 20)
    print(f"install {installed:.1f} ms, uninstall + empty report {exited:.1f} ms (target: install <= 10 ms)")
    for nodes in () if args.only else (10_000,) if args.quick else (10_000, 100_000, 1_000_000):
        print(f"graph walk of a wide {nodes:,}-node graph: {walk_rate(nodes):,.0f} nodes/s (target >= 1M nodes/s)")
    if torchviz is None:
        print("torchviz is not installed: its column is left out")
    results = []
    for workload in chosen:
        try:
            results.append(measure(workload, rounds, args.steps, modes))
        except Exception as exc:  # noqa: BLE001 - one failing workload leaves the others' figures
            results.append(Result(workload.name, 0, 0.0, error=f"{type(exc).__name__}: {exc}"))
        print(table(results[-1:], modes).splitlines()[-1], flush=True)
    print()
    print(f"ratios to the plain step, median of {rounds} rounds of {args.steps} steps (CPU of the main thread / wall)")
    print(table(results, modes))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
