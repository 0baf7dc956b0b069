"""What --html costs on a GPT-2-small-sized training step (CPU): audit time with and without it, and the file size.

    python benchmarks/html_gpt2.py [--repeat N]

Runs `gradaudit run benchmarks/gpt2_train.py` as a user would, N times each way (alternating, best time kept),
then `gradaudit report TRACE --html` on the saved trace (the rendering alone). Targets: the HTML adds under 10 s
and the file stays under 5 MB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROGRAM = Path(__file__).with_name("gpt2_train.py")


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    repeat = parser.parse_args().repeat
    gradaudit = [sys.executable, "-m", "gradaudit"]
    with tempfile.TemporaryDirectory() as tmp:
        html, trace = Path(tmp) / "report.html", Path(tmp) / "trace.json"
        plain = [*gradaudit, "run", str(PROGRAM), "--quiet", "--save-trace", str(trace)]
        with_html = [*plain, "--html", str(html)]
        times: dict[str, list[float]] = {"without --html": [], "with --html": []}
        for _ in range(repeat):
            times["without --html"].append(timed(plain))
            times["with --html"].append(timed(with_html))
        render = min(timed([*gradaudit, "report", str(trace), "--quiet", "--html", str(html)]) for _ in range(repeat))
        size = html.stat().st_size
    best = {label: min(values) for label, values in times.items()}
    for label, value in best.items():
        print(f"gradaudit run {label}: {value:.1f} s (best of {repeat}: {', '.join(f'{v:.1f}' for v in times[label])})")
    added = best["with --html"] - best["without --html"]
    print(f"--html adds {added:.1f} s to the audit (target: under 10 s)")
    print(f"gradaudit report TRACE --html (load, lint and render alone): {render:.1f} s")
    print(f"HTML file: {size / 1e6:.2f} MB (target: under 5 MB)")


if __name__ == "__main__":
    main()
