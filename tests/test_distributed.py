"""`torchrun --nproc_per_node 2 -m gradaudit run train_ddp.py` (gloo, CPU): rank 0 reports every rank's findings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def torchrun(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "gradaudit", "run", "train_ddp.py", "--json", str(report), "--", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    result = subprocess.run(command, cwd=FIXTURES, capture_output=True, text=True, timeout=60, env=environment)
    return result, json.loads(report.read_text()) if report.exists() else None


@pytest.mark.parametrize("args", [(), ("--orphan",)], ids=["clean", "orphan"])
def test_rank_0_alone_reports_the_findings_of_both_ranks(tmp_path, args):
    result, report = torchrun(tmp_path, *args)
    assert result.stdout.count("gradaudit train_ddp.py:") == 1  # the other rank is quiet
    if not args:
        assert result.returncode == 0 and report["findings"] == []
        return
    (orphan,) = [f for f in report["findings"] if f["rule"] == "GA201"]
    assert "aux_head" in orphan["message"] and orphan["message"].endswith("(ranks 0, 1)")


def test_parameters_unused_on_one_rank_are_named_by_the_rank_that_fails(tmp_path):
    result, _ = torchrun(tmp_path, "--unused-on-rank", "1")
    assert result.returncode != 0 and "Expected to have finished reduction" in result.stderr
    assert "rank 1 failed" in result.stderr
    assert "GA202" in result.stdout and "model.module.aux_head.weight" in result.stdout
