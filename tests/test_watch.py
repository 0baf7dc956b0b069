"""Whole-run watching (`gradaudit run --watch --every K`): the program runs to its end, sampled."""

from conftest import fixture_line


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
