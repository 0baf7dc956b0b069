"""What --html costs on a GPT-2-small-sized training step (CPU): audit time with and without it, and the file size.

    python benchmarks/html_gpt2.py [--repeat N] [--no-end-to-end]

1. In one process, as `gradaudit run benchmarks/gpt2_train.py --html` does it: the audit with the raw autograd
   graph recorded (the time spent recording it is measured), then the HTML written (timed): the two costs --html
   adds, free of the noise of a shared machine.
2. End to end: `gradaudit run` N times each way, alternating, the best time kept.
Targets: the HTML adds under 10 s and the file stays under 5 MB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradaudit.capture import Audit
from gradaudit.capture.rawgraph import RawGraphRecorder
from gradaudit.config import Config
from gradaudit.report.html import write_html
from gradaudit.runner import run_program

PROGRAM = Path(__file__).with_name("gpt2_train.py")


def in_process(html: Path) -> tuple[float, float]:
    """(seconds recording the raw graphs, seconds writing the HTML) for one audited run."""
    recording = 0.0
    capture = RawGraphRecorder.capture

    def timed_capture(self: RawGraphRecorder, *args: object) -> None:
        nonlocal recording
        start = time.perf_counter()
        capture(self, *args)
        recording += time.perf_counter() - start

    RawGraphRecorder.capture = timed_capture
    try:
        audit = Audit(iterations=Config().iterations, raw_graph=True, program=str(PROGRAM))
        outcome = run_program(audit, str(PROGRAM), [], as_module=False)
    finally:
        RawGraphRecorder.capture = capture
    audit.finish(outcome.stopped_by)
    assert audit.trace is not None
    start = time.perf_counter()
    write_html(audit.trace, audit.findings, html)
    return recording, time.perf_counter() - start


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "report.html"
        recording, writing = in_process(html)
        print(f"recording the raw autograd graph during the audit: {recording:.3f} s")
        print(f"writing the HTML (report, graphviz layout, page): {writing:.2f} s")
        print(f"--html adds {recording + writing:.2f} s (target: under 10 s)")
        print(f"HTML file: {html.stat().st_size / 1e6:.2f} MB (target: under 5 MB)")
        if not options.end_to_end:
            return
        plain = [sys.executable, "-m", "gradaudit", "run", str(PROGRAM), "--quiet"]
        runs: dict[str, list[float]] = {"without --html": [], "with --html": []}
        for _ in range(options.repeat):
            runs["without --html"].append(timed(plain))
            runs["with --html"].append(timed([*plain, "--html", str(html)]))
        for label, values in runs.items():
            print(
                f"gradaudit run {label}: best of {options.repeat} {min(values):.1f} s ({', '.join(f'{v:.1f}' for v in values)})"
            )


if __name__ == "__main__":
    main()
