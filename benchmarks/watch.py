"""Whole-run cost of watching: `python benchmarks/watch.py [--iterations N] [--rounds R] [--every K]`.

Each round runs the same number of training iterations of each workload twice in one process, alternating: plain,
and under `gradaudit.audit(iterations=3, watch=...)` (install, the full first window, light samples at the pace
chosen, the report's trace). Prints the median over rounds of the main thread's CPU time (`time.thread_time`) and
wall time, watched over plain, for the whole run and for the run after the first window (the part K governs), and
the pace gradaudit chose. One thread; denormals flushed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import workloads  # noqa: E402

import gradaudit  # noqa: E402

WINDOW = 3
WORKLOADS = {
    "actor-critic MLP": workloads.make_actor_critic,
    "flow sampler x20": workloads.make_flow_sampler,
    "LSTM x200": workloads.make_lstm,
}


def clocks() -> tuple[float, float]:
    return time.thread_time(), time.perf_counter()


def run(step: workloads.Step, iterations: int, watch: bool | int) -> tuple[tuple[float, float], ...]:
    """(CPU, wall) seconds of the whole run and of the iterations after the first window (the stretch the pace
    governs: the report at the end is left out); then the pace chosen and the report's wall seconds."""
    start = clocks()
    audit = gradaudit.audit(iterations=WINDOW, watch=watch) if watch else None
    if audit is not None:
        audit.__enter__()
    for iteration in range(iterations):
        if iteration == WINDOW + 1:  # the window closes at the step of iteration WINDOW + 1
            after_window = clocks()
        step()
    stretch = clocks()
    if audit is not None:
        audit.__exit__(None, None, None)
    end = clocks()
    pace = (audit.trace.watch.every, audit.trace.watch.cost or 0.0) if audit is not None else (0, 0.0)
    after = (stretch[0] - after_window[0], stretch[1] - after_window[1])
    return (end[0] - start[0], end[1] - start[1]), after, (*pace, end[1] - stretch[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=None, help="a fixed pace (default: chosen by gradaudit)")
    parser.add_argument("--only", default="", help="workloads whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    print(
        "workload | plain ms/iter | whole run CPU (wall) | after window, before the report CPU (wall) | every | "
        "cost estimate | report ms"
    )
    for name, make in WORKLOADS.items():
        if args.only not in name:
            continue
        step = make()
        step()  # warm-up
        ratios: list[tuple[float, float, float, float]] = []
        plain_ms, paces = [], []
        for _ in range(args.rounds):
            plain_whole, plain_after, _ = run(step, args.iterations, False)
            watched_whole, watched_after, pace = run(step, args.iterations, args.every or True)
            ratios.append(
                (
                    watched_whole[0] / plain_whole[0],
                    watched_whole[1] / plain_whole[1],
                    watched_after[0] / plain_after[0],
                    watched_after[1] / plain_after[1],
                )
            )
            plain_ms.append(plain_whole[1] / args.iterations * 1e3)
            paces.append(pace)
        cpu, wall, cpu_after, wall_after = (statistics.median(r[i] for r in ratios) for i in range(4))
        every, cost, report = paces[len(paces) // 2]
        print(
            f"{name} | {statistics.median(plain_ms):.2f} | {cpu:.3f}x ({wall:.3f}x) | {cpu_after:.3f}x "
            f"({wall_after:.3f}x) | {every} | {cost:.3f} | {report * 1e3:.0f}"
        )


if __name__ == "__main__":
    main()
