"""The command line on real programs: exit codes, bad input, program behaviours."""

import json

from gradaudit.report import REPORT_VERSION
from gradaudit.rules import RULES
from gradaudit.trace import TRACE_VERSION
from tests.conftest import FIXTURES, fixture_line


def test_missing_script_is_exit_2(gradaudit_cli):
    result = gradaudit_cli("run", "does_not_exist.py")
    assert result.exit_code == 2
    assert "no such script: does_not_exist.py" in result.output


def test_missing_module_is_exit_2(gradaudit_cli):
    result = gradaudit_cli("run", "-m", "no_such_package.train")
    assert result.exit_code == 2
    assert "no module named 'no_such_package.train'" in result.output


def test_program_without_backward_lists_optimizers(gradaudit_cli):
    result = gradaudit_cli("run", "no_backward.py")
    assert result.exit_code == 2
    assert "no backward call seen" in result.output
    assert "Adam 'optimizer' (no_backward.py:7)" in result.output


def test_crash_before_first_iteration_shows_its_traceback(gradaudit_cli):
    result = gradaudit_cli("run", "crash_early.py")
    assert result.exit_code == 2
    assert 'crash_early.py", line 10' in result.output
    assert "RuntimeError: data file is corrupt before completing a training iteration" in result.output
    assert "gradaudit/" not in result.output.split("Traceback")[1].split("gradaudit: error")[0]


def test_crash_after_iterations_reports_what_was_seen(gradaudit_cli):
    result = gradaudit_cli("run", "crash_late.py")
    assert result.exit_code == 1
    assert "ValueError: diverged after 2 iteration(s)" in " ".join(result.output.split())
    assert [f["subject"] for f in result.findings("GA202")] == ["head"]


def test_sys_exit_is_audited(gradaudit_cli):
    result = gradaudit_cli("run", "sys_exit.py")
    assert result.report["window"] == {"iterations": 2, "stopped_by": "program-end", "note": ""}
    assert [f["subject"] for f in result.findings("GA202")] == ["unused"]


def test_dataloader_workers_and_closures_are_audited(gradaudit_cli):
    for script in ("dataloader_workers.py", "closure.py"):
        result = gradaudit_cli("run", script, "--iterations", "2")
        assert result.exit_code == 0, script
        assert result.report["window"]["stopped_by"] == "iterations"
        assert result.report["groups"][0]["grad_norm"] > 0


def test_window_grows_until_every_optimizer_stepped(gradaudit_cli):
    result = gradaudit_cli("run", "gan.py", "--iterations", "1")
    steps = {o["name"]: o["steps"] for o in result.report["optimizers"]}
    assert steps["g_optimizer"] >= 1 and steps["d_optimizer"] == 2


def test_fail_on_select_and_ignore(gradaudit_cli):
    assert gradaudit_cli("run", "entropy_bonus.py", "--fail-on", "info", "--", "--ent-coef", "0").exit_code == 1
    assert gradaudit_cli("run", "dqn.py", "--ignore", "GA206", "--", "--bug").exit_code == 0
    assert gradaudit_cli("run", "dqn.py", "--select", "GA1", "--", "--bug").findings() == []


def test_saved_trace_reports_the_same(gradaudit_cli, tmp_path):
    trace = tmp_path / "trace.json"
    live = gradaudit_cli("run", "encoder_layout.py", "--save-trace", str(trace), "--", "--layout", "encoder-in-actor")
    offline = gradaudit_cli("report", str(trace))
    assert offline.exit_code == live.exit_code == 1
    assert offline.report["findings"] == live.report["findings"]


def test_corrupt_trace_is_exit_2(gradaudit_cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = gradaudit_cli("report", str(bad))
    assert result.exit_code == 2 and "not a readable trace JSON file" in result.output
    bad.write_text(json.dumps({"version": TRACE_VERSION, "program": "x"}))
    result = gradaudit_cli("report", str(bad))
    assert result.exit_code == 2 and "damaged gradaudit trace" in result.output


def test_rules_catalog_and_documentation(gradaudit_cli):
    listing = gradaudit_cli("rules")
    assert all(rule.code in listing.output for rule in RULES)
    doc = gradaudit_cli("rules", "GA203")
    assert "discarded-grad" in doc.output and "Bad" in doc.output and "Good" in doc.output and "Fix" in doc.output
    assert gradaudit_cli("rules", "GA999").exit_code == 2


def test_program_exiting_with_an_error_before_backward_is_exit_2(gradaudit_cli):
    result = gradaudit_cli("run", "encoder_layout.py", "--", "--no-such-flag")
    assert result.exit_code == 2
    assert "the program exited with status 2 before any backward call" in result.output


def test_report_shows_chains_and_term_matrix(gradaudit_cli):
    result = gradaudit_cli("run", "flow_sampler.py")
    assert result.report["version"] == REPORT_VERSION
    (chain,) = result.report["chains"]
    assert chain["module"] == "velocity_net" and chain["calls"] == chain["carried"] == 10
    assert chain["location"] == {"file": "flow_sampler.py", "line": fixture_line("flow_sampler.py", "GA301-here")}
    assert chain["min_amplification"] <= chain["amplification"] and chain["amplification"] > 100
    assert len(chain["output_norms"]) == len(chain["param_shares"]) == 10 and 0 < chain["first_share"] < 1
    (entry,) = result.report["matrix"]
    assert entry["groups"] == ["velocity_net"] and [row["term"] for row in entry["rows"]] == ["q_loss"]
    assert "chains: gradient growth" in result.output and "term × group gradient norms" in result.output


def test_report_shows_clamps_and_exps(gradaudit_cli):
    result = gradaudit_cli("run", "ppo_clamp.py", "--", "--big-move")
    guard = next(
        c for c in result.report["clamps"] if c["location"]["line"] == fixture_line("ppo_clamp.py", "GA303-here")
    )
    assert (guard["op"], guard["lower"], guard["upper"]) == ("clamp", -20, 20) and guard["saturated"] > 0.5
    exp = next(e for e in result.report["exps"] if e["location"]["line"] == fixture_line("ppo_clamp.py", "GA304-here"))
    assert exp["op"] == "exp" and exp["max_input"] == 20 and exp["dtype"] == "float32"
    assert "clamps and exp" in result.output


def test_output_paths_are_checked_before_the_program_runs(gradaudit_cli, tmp_path):
    missing = tmp_path / "no_such_folder" / "out.json"
    for flag in ("--json", "--save-trace"):
        result = gradaudit_cli("run", "chdir_then_file.py", flag, str(missing))
        assert result.exit_code == 2 and result.report is None
        assert f"gradaudit: error: {flag} {missing}: the folder {missing.parent} does not exist" in result.output
        assert "as-python:" not in result.output and result.output.count("\n") == 1
    result = gradaudit_cli("report", "trace.json", "--json", str(missing))
    assert result.exit_code == 2 and "does not exist" in result.output and "no trace file" not in result.output
    result = gradaudit_cli("run", "chdir_then_file.py", "--save-trace", str(tmp_path))
    assert result.exit_code == 2 and "is a folder, not a file" in result.output


def test_relative_output_paths_are_relative_to_where_gradaudit_started(gradaudit_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # chdir_then_file.py moves to the temp folder while it runs
    result = gradaudit_cli(
        "run", str(FIXTURES / "chdir_then_file.py"), "--json", "report.json", "--save-trace", "t.json"
    )
    assert result.exit_code == 0 and result.report["window"]["stopped_by"] == "iterations"
    assert (tmp_path / "t.json").is_file()


def test_damaged_traces_are_one_line_exit_2(gradaudit_cli, tmp_path):
    trace_path = tmp_path / "trace.json"
    assert gradaudit_cli("run", "sys_exit.py", "--save-trace", str(trace_path)).exit_code == 1
    trace = json.loads(trace_path.read_text())
    trace["events"][0]["optimizer"] = 7
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(trace))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for path, message in ((damaged, "events[0].optimizer: 7 names no optimizer"), (deep, "nested too deeply")):
        result = gradaudit_cli("report", str(path))
        assert result.exit_code == 2 and message in result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
