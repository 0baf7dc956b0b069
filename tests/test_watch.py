"""Whole-run watching (`gradaudit run --watch --every K`): the program runs to its end, sampled."""

import json
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from conftest import FIXTURES, fixture_line
from torch import nn

import gradaudit
from gradaudit.capture.watching import FIRST_GAP, Pace
from gradaudit.trace import Watch


def test_a_nan_first_appearing_late_is_found_with_its_iteration(gradaudit_cli):
    result = gradaudit_cli("run", "late_nan.py", "--watch", "--every", "25", "--", "--iterations", "300")
    report = result.report
    assert "finished 300" in result.output  # never stopped
    assert report["window"]["iterations"] == 300 and report["window"]["stopped_by"] == "program-end"
    (loss,) = [f for f in report["findings"] if f["rule"] == "GA305" and f["subject"] == "loss"]
    assert loss["first_iteration"] == 200 and loss["occurrences"] >= 2
    assert loss["location"]["line"] == fixture_line("late_nan.py", "backward")
    watch = report["watch"]
    assert watch["every"] == 25 and watch["iterations"][0] == 1
    assert watch["full"][watch["iterations"].index(201)]  # the iteration after the NaN: a full audit
    assert len(watch["group_norms"]["model"]) == len(watch["iterations"])
    assert "gradient norm per group over the run" in result.output


def test_a_clean_run_is_watched_in_light_samples_without_findings(gradaudit_cli):
    result = gradaudit_cli(
        "run", "late_nan.py", "--watch", "--every", "10", "--", "--iterations", "60", "--nan-at", "0"
    )
    watch = result.report["watch"]
    assert result.report["findings"] == []
    assert watch["iterations"] == [1, 11, 21, 31, 41, 51] and watch["full"] == [True] + [False] * 5
    assert all(norm is not None for norm in watch["group_norms"]["model"])


def test_a_gradient_norm_jump_gets_a_full_audit_at_the_next_iteration(gradaudit_cli):
    args = ["--iterations", "200", "--nan-at", "0", "--explode-at", "140"]
    watch = gradaudit_cli("run", "late_nan.py", "--watch", "--every", "25", "--", *args).report["watch"]
    jumped = watch["iterations"].index(151)  # the first sample after the jump, light
    assert not watch["full"][jumped] and watch["iterations"][jumped + 1] == 152 and watch["full"][jumped + 1]
    norms = watch["group_norms"]["model"]
    assert norms[jumped] > 100 * norms[jumped - 1]


def test_a_chain_that_training_drifts_into_explosion_is_found_with_its_iteration(gradaudit_cli):
    """The unrolled cell starts contracting; training pushes its weight from 0.9 toward 1.3, so the chain amplifies
    the gradient 1.3^19 ≈ 150x after about 120 iterations. The loss gradient shrinks meanwhile: the group's norm
    never jumps 100x between samples, and only the chain reading of the light samples calls for full audits."""
    result = gradaudit_cli("run", "drifting_chain.py", "--watch", "--every", "10", "--", "--gain", "1.3")
    assert "finished 300" in result.output
    (chain,) = result.findings("GA301")
    assert chain["subject"] == "cell"
    assert chain["location"] == {"file": "drifting_chain.py", "line": fixture_line("drifting_chain.py", "unrolled")}
    watch = result.report["watch"]
    first = watch["iterations"].index(chain["first_iteration"])
    assert watch["full"][first] and not watch["full"][first - 1]  # a light sample called for this full audit
    assert watch["iterations"][first - 1] == chain["first_iteration"] - 1
    assert 60 < chain["first_iteration"] < 200  # not in the first window: the chain was stable then
    assert not result.report["chains"] or all(c["module"] == "cell" for c in result.report["chains"])
    norms = watch["group_norms"]["cell"]
    assert all(later < 100 * earlier for earlier, later in zip(norms, norms[1:], strict=False))


def test_a_chain_that_stays_contracting_is_not_reported(gradaudit_cli):
    result = gradaudit_cli("run", "drifting_chain.py", "--watch", "--every", "10", "--", "--gain", "0.95")
    assert result.report["findings"] == []
    assert result.report["watch"]["full"] == [True] + [False] * (len(result.report["watch"]["full"]) - 1)


def test_by_default_the_pace_is_chosen_from_the_measured_costs(gradaudit_cli):
    result = gradaudit_cli("run", "late_nan.py", "--watch", "--", "--iterations", "120", "--nan-at", "0")
    watch = result.report["watch"]
    assert watch["automatic"] and watch["budget"] == 0.06
    assert watch["every_per_sample"][:2] == [FIRST_GAP, FIRST_GAP] and watch["iterations"][:2] == [1, 1 + FIRST_GAP]
    samples = list(zip(watch["iterations"], watch["full"], watch["every_per_sample"], strict=True))
    for (start, _, _), (following, full, every) in zip(samples, samples[1:], strict=False):
        # light: `every` (as chosen then) after the last; full: as soon as the sample before it closed
        assert (following - start <= 2) if full else (following - start == every), watch
    assert watch["every"] >= watch["sample_seconds"] / (watch["budget"] * watch["iteration_seconds"]), watch
    assert watch["cost"] <= 1 + watch["budget"] + 1e-9, watch
    assert f"one light sample every {watch['every']} iterations" in result.output.replace("\n", " ")


def _paced(watch: Watch) -> tuple[Pace, Callable[[int, float], None], Callable[..., int]]:
    """A Pace on a fake clock, with (plain iterations of given seconds, a light sample then one plain iteration)."""
    now = [0.0]
    pace = Pace(watch, clock=lambda: now[0])

    def plain_iterations(count: int, seconds: float = 0.010) -> None:
        for _ in range(count):
            now[0] += seconds
            pace.plain_iteration_ended()

    def light_sample(seconds: float, after: float = 0.010) -> int:
        pace.sample_started()
        now[0] += seconds
        pace.sample_ended(light=True)
        plain_iterations(1, after)
        return watch.every

    pace.sample_ended(light=False)  # the first window closes: plain iterations are timed from here
    return pace, plain_iterations, light_sample


def test_the_pace_keeps_light_samples_within_the_budget():
    watch = Watch(FIRST_GAP, automatic=True, budget=0.1)
    _, plain_iterations, light_sample = _paced(watch)
    plain_iterations(9)
    # 10 ms more in the sample and 20 ms more in the iteration after it (what it left behind): 30 ms per sample,
    # 10 ms per iteration: 30 iterations for 10 %
    assert light_sample(0.010 + 0.010, after=0.010 + 0.020) == 30
    assert watch.iteration_seconds == pytest.approx(0.010) and watch.sample_seconds == pytest.approx(0.030)
    assert watch.cost == pytest.approx(1.1)
    plain_iterations(28)
    assert light_sample(0.010 + 0.012) == 21  # the mean fell to 21 ms


def test_an_automatic_pace_shrinks_by_half_at_most_per_sample():
    """A cheap-looking sample on a busy machine is one measurement: the pace shrinks toward it gradually."""
    watch = Watch(FIRST_GAP, automatic=True, budget=0.1)
    _, plain_iterations, light_sample = _paced(watch)
    chosen = []
    for _ in range(3):
        plain_iterations(watch.every - 2)
        chosen.append(light_sample(0.010 + 0.0005))  # half a millisecond more: a sample per iteration costs 5 %
    assert chosen == [FIRST_GAP // 2, FIRST_GAP // 4, 1]


def test_an_explicit_pace_stays_and_is_still_costed():
    watch = Watch(25, budget=0.1)
    _, plain_iterations, light_sample = _paced(watch)
    plain_iterations(24)
    assert light_sample(0.060) == 25 and watch.cost == pytest.approx(1.2)


def test_ctrl_c_during_a_watched_run_reports_what_was_gathered(tmp_path):
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "gradaudit", "run", "endless_training.py", "--watch", "--every", "10"]
    command += ["--json", str(report_path), "--", "--nan-at", "100"]
    process = subprocess.Popen(command, cwd=FIXTURES, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.strip() == "iteration 150":
                process.send_signal(signal.SIGINT)
                break
        output, errors = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, errors
    report = json.loads(report_path.read_text())
    assert report["window"]["stopped_by"] == "interrupted" and report["window"]["iterations"] >= 150
    watch = report["watch"]
    assert watch["iterations"][:3] == [1, 11, 21] and watch["iterations"][-1] >= 141
    assert watch["full"][watch["iterations"].index(101)]  # after the NaN at 100
    (loss,) = [f for f in report["findings"] if f["rule"] == "GA305" and f["subject"] == "loss"]
    assert loss["first_iteration"] == 100
    assert loss["location"]["line"] == fixture_line("endless_training.py", "backward")
    assert "gradient norm per group over the run" in output


def test_the_library_watches_a_loop_given_a_pace():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradaudit.audit(iterations=1, watch=5) as audit:
        for iteration in range(1, 31):
            x = torch.randn(8, 4)
            if iteration >= 12:
                x[0, 0] = float("nan")
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    assert audit.trace.watch.iterations[:5] == [1, 6, 11, 13, 18]  # 12 had the first NaN: a full audit at 13
    assert audit.trace.watch.full[:5] == [True, False, False, True, False]
    (loss,) = [f for f in audit.findings if f.rule == "GA305" and f.subject == "loss"]
    assert loss.first_iteration == 12


def test_between_samples_nothing_of_the_audit_runs_in_torch_calls():
    """Idle, the provenance mode is off the stack and no module hook is left: the program runs at full speed."""
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    idle: list[bool] = []
    with gradaudit.audit(iterations=1, watch=5) as audit:
        for _ in range(30):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            optimizer.step()
            hooked = torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
            idle.append(not torch.overrides._get_current_function_mode_stack() and not hooked)
    sampled = {i - offset for i in audit.trace.watch.iterations for offset in (1, 2)}  # armed at the step before
    assert [i for i, free in enumerate(idle[:-1]) if not free and i not in sampled] == []  # the last arms a sample
    assert sum(idle) >= 20
