"""benchmarks/run.py runs (a smoke run at tiny sizes: its figures are not checked, timing is no test)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).parents[1] / "benchmarks" / "run.py"


def test_benchmark_prints_a_ratio_per_mode_for_the_workload():
    command = [sys.executable, str(RUN), "--quick", "--only", "actor-critic"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    table = result.stdout.split("ratios to the plain step")[1].splitlines()
    header, row = table[1], table[2]
    assert "light cpu/wall" in header and "full cpu/wall" in header and "detect_anomaly cpu/wall" in header
    modes = 4 if importlib.util.find_spec("torchviz") else 3  # make_dot + source, where torchviz is installed
    assert row.startswith("actor-critic MLP") and row.count("x /") == modes
    assert "install" in result.stdout
