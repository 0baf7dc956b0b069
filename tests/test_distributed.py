"""`torchrun --nproc_per_node 2 -m gradaudit run train_ddp.py` (gloo, CPU): rank 0 reports every rank's findings; a
backward that leaves DistributedDataParallel's reduction unfinished is said on stderr before DDP's own error."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
"""--standalone: a rendezvous on a free port with a fresh run id (the name of the folder the ranks meet in)."""
TIMEOUT_S = 180
STOP_S = 60
"""How long torchrun is given to end its ranks once stopped."""
DDP_ERROR = "Expected to have finished reduction in the prior iteration"


def line_of(fixture: str, marker: str) -> int:
    lines = (FIXTURES / fixture).read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if marker in line)


def notice(where: str, ddp: str, rank: str = "") -> str:
    return (
        f"gradaudit: {rank}the backward at {where} did not reach 2 of the 4 parameters of DistributedDataParallel "
        f"'{ddp}' ({ddp}.module.aux_head.weight, {ddp}.module.aux_head.bias): without find_unused_parameters=True, "
        f'DDP will raise "{DDP_ERROR}" at its next forward unless a backward reaches them first'
    )


def launch(tmp_path: Path, command: list[str]) -> subprocess.CompletedProcess:
    """Runs torchrun; on a timeout or an interrupt it is stopped with SIGTERM, on which it ends its ranks (each runs
    in a session of its own: killing torchrun alone would leave them running)."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(FIXTURES.parent.parent),  # the gradaudit under test, whatever the working folder
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path),
    }
    process = subprocess.Popen(
        command, cwd=FIXTURES, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stdout, stderr = stop(process)
        pytest.fail(f"torchrun did not end within {TIMEOUT_S} s\n{stdout[-2000:]}\n{stderr[-4000:]}")
    except BaseException:
        stop(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def stop(process: subprocess.Popen) -> tuple[str, str]:
    process.terminate()
    try:
        return process.communicate(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def torchrun(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    report = tmp_path / "report.json"
    result = launch(tmp_path, [*TORCHRUN, "-m", "gradaudit", "run", "train_ddp.py", "--json", str(report), "--", *args])
    return result, json.loads(report.read_text()) if report.exists() else None


def told(result: subprocess.CompletedProcess) -> str:
    """What torchrun printed, for an assertion that fails (a rank that crashed says why there)."""
    return f"exit status {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}"


def rank_statuses(torchrun_stderr: str) -> dict[int, int]:
    """The exit status of each failed rank, from torchrun's summary."""
    pairs = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", torchrun_stderr)
    return {int(rank): int(status) for rank, status in pairs}


@pytest.mark.parametrize("args", [(), ("--orphan",)], ids=["clean", "orphan"])
def test_rank_0_alone_reports_the_findings_of_both_ranks(tmp_path, args):
    result, report = torchrun(tmp_path, *args)
    assert result.stdout.count("gradaudit train_ddp.py:") == 1, told(result)  # the other rank is quiet
    assert "did not reach" not in result.stderr
    if not args:
        assert result.returncode == 0 and report["findings"] == [], told(result)
        return
    (orphan,) = [f for f in report["findings"] if f["rule"] == "GA201"]
    assert "aux_head" in orphan["message"] and orphan["message"].endswith("(ranks 0, 1)")


def test_parameters_unused_on_one_rank_are_named_before_ddp_fails(tmp_path):
    result, report = torchrun(tmp_path, "--unused-on-rank", "1")
    said = notice(f"train_ddp.py:{line_of('train_ddp.py', '# backward')}", "model", rank="rank 1: ")
    assert said in result.stderr, told(result)
    assert result.stderr.count("did not reach") == 1  # rank 0 reached every parameter
    assert result.stderr.index(said) < result.stderr.index(DDP_ERROR)
    (unused,) = [f for f in report["findings"] if f["rule"] == "GA202"]  # reported by rank 1, which failed
    assert unused["subject"] == "model" and unused["message"].endswith("(rank 1)")
    assert "model.module.aux_head.weight" in unused["message"]
    assert unused["location"]["line"] == line_of("train_ddp.py", "# optimizer")
    plain = launch(tmp_path, [*TORCHRUN, "train_ddp.py", "--unused-on-rank", "1"])
    assert DDP_ERROR in plain.stderr and "gradaudit" not in plain.stderr
    assert result.returncode == plain.returncode != 0, told(plain)
    assert rank_statuses(result.stderr)[1] == rank_statuses(plain.stderr)[1] == 1, told(result) + told(plain)


def test_ddp_that_finds_unused_parameters_itself_gets_no_notice(tmp_path):
    result, _ = torchrun(tmp_path, "--unused-on-rank", "1", "--find-unused")
    assert DDP_ERROR not in result.stderr and "did not reach" not in result.stderr, told(result)
    assert result.stdout.count("gradaudit train_ddp.py:") == 1, told(result)


def test_only_the_ddp_module_left_waiting_is_named(gradaudit_cli, capsys):
    """Inside no_sync, with static_graph, with find_unused_parameters DDP lets the head go without gradient; the
    plain module then fails, and the notice names it alone, before the error."""
    result = gradaudit_cli("run", "-n", "20", "ddp_one_rank.py")
    said = notice(f"ddp_one_rank.py:{line_of('ddp_one_rank.py', '# backward')}", "plain")
    assert result.exit_code == 1 and said in result.output and result.output.count("did not reach") == 1
    assert result.output.index(said) < result.output.index(DDP_ERROR)
