"""Settings: [tool.gradaudit] discovery, command-line precedence, rule options, and bad settings as exit 2."""

import pytest

from gradaudit.config import Config, ConfigError, load_config, parse_option
from gradaudit.findings import Severity
from gradaudit.rules import RULES, options_by_rule, rule_by_code, run_rules
from gradaudit.trace import Trace, Window
from tests.conftest import FIXTURES

FILE_SETTINGS = """
[tool.gradaudit]
select = ["GA2", "exploding-chain"]
ignore = ["GA206"]
fail-on = "error"
iterations = 5

[tool.gradaudit.GA301]
max_amplification = 50
"""


def write_pyproject(folder, text: str):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pyproject.toml"
    path.write_text(text)
    return path


def test_nearest_pyproject_with_a_gradaudit_table_wins(tmp_path, monkeypatch):
    settings = write_pyproject(tmp_path, FILE_SETTINGS)
    write_pyproject(tmp_path / "project", '[project]\nname = "without-gradaudit-settings"\n')
    monkeypatch.chdir(write_pyproject(tmp_path / "project" / "src" / "pkg", "").parent)
    assert load_config() == Config(
        select=("GA2", "exploding-chain"),
        ignore=("GA206",),
        fail_on=Severity.error,
        iterations=5,
        options={"GA301.max_amplification": 50},
        source=settings,
    )


def test_no_gradaudit_table_means_defaults(tmp_path):
    write_pyproject(tmp_path, "[tool.ruff]\nline-length = 120\n")
    assert load_config(tmp_path) == Config()


def test_flags_win_over_the_file(tmp_path):
    write_pyproject(tmp_path, FILE_SETTINGS)
    config = load_config(tmp_path).override(
        select=["GA3"], fail_on=Severity.info, options={"GA301.min_calls": 4.0, "GA301.max_amplification": 10.0}
    )
    assert config.select == ("GA3",) and config.ignore == ("GA206",)
    assert config.fail_on == Severity.info and config.iterations == 5
    assert config.options == {"GA301.max_amplification": 10.0, "GA301.min_calls": 4.0}


def test_parse_option():
    assert parse_option("GA301.max_amplification=50") == ("GA301.max_amplification", 50.0)
    assert parse_option("GA301.min_calls = 1e1") == ("GA301.min_calls", 10.0)
    for bad in ("GA301.max_amplification", "max_amplification=50", "GA301.max_amplification=big"):
        with pytest.raises(ConfigError, match="--option"):
            parse_option(bad)


def test_each_rule_gets_its_own_options_over_its_defaults():
    options = options_by_rule({"GA301.max_amplification": 50, "exploding-chain.min_calls": 5})
    exploding = rule_by_code("GA301")
    assert options["GA301"] == {**exploding.options, "max_amplification": 50.0, "min_calls": 5.0}
    assert all(options[rule.code] == rule.options for rule in RULES if rule is not exploding)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("GA999.max_amplification", 1.0, "names no rule 'GA999'"),
        ("GA301", 1.0, "is not CODE.name"),
        ("GA301.max_amplificatio", 1.0, "GA301 has no option 'max_amplificatio'"),
        ("GA301.max_amplification", "big", "GA301.max_amplification must be a number"),
        ("GA301.max_amplification", True, "GA301.max_amplification must be a number"),
        ("GA301.max_amplification", float("nan"), "GA301.max_amplification must be a number"),
    ],
)
def test_bad_rule_options_are_config_errors(key, value, message):
    trace = Trace(program="train.py", window=Window(1, "iterations"))
    with pytest.raises(ConfigError, match=message):
        run_rules(trace, options={key: value})


def test_rules_print_their_options_qualified(gradaudit_cli):
    for rule in (r for r in RULES if r.options):
        output = gradaudit_cli("rules", rule.code).output
        assert all(f"{rule.code}.{name} = {default:g}" in output for name, default in rule.options.items())
        assert f"-o {rule.code}.NAME=VALUE" in output and f"[tool.gradaudit.{rule.code}]" in output


def test_pyproject_settings_and_flags_on_a_real_run(gradaudit_cli, tmp_path, monkeypatch):
    write_pyproject(tmp_path, '[tool.gradaudit]\nfail-on = "error"\niterations = 2\n')
    monkeypatch.chdir(tmp_path)
    dqn = str(FIXTURES / "dqn.py")
    from_file = gradaudit_cli("run", dqn, "--", "--bug")
    assert from_file.codes() == ["GA206"] and from_file.exit_code == 0  # a warning, below fail-on = "error"
    assert from_file.report["window"]["iterations"] == 2
    from_flags = gradaudit_cli("run", dqn, "--fail-on", "warning", "-n", "1", "--", "--bug")
    assert from_flags.exit_code == 1 and from_flags.report["window"]["iterations"] == 1


def test_rule_options_from_file_and_flags(gradaudit_cli, tmp_path, monkeypatch):
    flow_sampler = str(FIXTURES / "flow_sampler.py")  # the gradient grows ~330x, ~1.9x per step
    assert "GA301" in gradaudit_cli("run", flow_sampler).codes()
    write_pyproject(tmp_path, "[tool.gradaudit.GA301]\nmax_amplification = 1000\nmax_step_amplification = 3\n")
    monkeypatch.chdir(tmp_path)
    trace = tmp_path / "trace.json"
    assert "GA301" not in gradaudit_cli("run", flow_sampler, "--save-trace", str(trace)).codes()
    assert "GA301" in gradaudit_cli("run", flow_sampler, "-o", "GA301.max_step_amplification=1.5").codes()
    assert "GA301" not in gradaudit_cli("report", str(trace)).codes()
    assert "GA301" in gradaudit_cli("report", str(trace), "--option", "GA301.max_amplification=100").codes()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("[tool.gradaudit\nselect = 1", "is not a readable TOML file"),
        ('[tool.gradaudit]\nfail-on = "fatal"', "fail-on must be one of info, warning, error, got 'fatal'"),
        ("[tool.gradaudit]\niterations = 0", "iterations must be a positive integer, got 0"),
        ('[tool.gradaudit]\nselect = "GA1"', "select must be a list of rule codes, prefixes or names"),
        ("[tool.gradaudit]\nfail_on = 'error'", "unknown key 'fail_on' in [tool.gradaudit]"),
        ('[tool.gradaudit]\nselect = ["GA2", "GA999"]', "select 'GA999': matches no rule"),
        ('[tool.gradaudit]\nignore = [""]', "ignore '': matches no rule"),
        ("[tool.gradaudit.GA999]\nlimit = 1", "names no rule 'GA999'"),
        ("[tool.gradaudit.GA301]\nmax_amp = 1", "GA301 has no option 'max_amp'"),
        ('[tool.gradaudit.GA301]\nmax_amplification = "big"', "GA301.max_amplification must be a number"),
    ],
)
def test_bad_pyproject_is_one_line_exit_2(gradaudit_cli, tmp_path, monkeypatch, settings, message):
    pyproject = write_pyproject(tmp_path, settings)
    monkeypatch.chdir(tmp_path)
    for command in (("run", str(FIXTURES / "dqn.py")), ("report", "trace.json")):
        result = gradaudit_cli(*command)
        assert result.exit_code == 2 and result.report is None
        assert result.output.startswith(f"gradaudit: error: {pyproject}") and message in result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("GA301.max_amplification=big", "'big' is not a number"),
        ("max_amplification=50", "is not CODE.NAME=VALUE"),
        ("GA999.limit=1", "names no rule 'GA999'"),
        ("GA301.max_amp=1", "GA301 has no option 'max_amp'"),
    ],
)
def test_bad_option_flag_is_one_line_exit_2(gradaudit_cli, option, message):
    result = gradaudit_cli("run", "dqn.py", "-o", option)
    assert result.exit_code == 2 and message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--select", "GA999"), "--select 'GA999': matches no rule"),
        (("--select", "GA2,dead-trm"), "--select 'dead-trm': matches no rule"),
        (("--ignore", "GA7"), "--ignore 'GA7': matches no rule"),
    ],
)
def test_a_rule_pattern_that_matches_nothing_is_exit_2(gradaudit_cli, flags, message):
    for command in (("run", "dqn.py"), ("report", "trace.json")):
        result = gradaudit_cli(*command, *flags)
        assert result.exit_code == 2 and message in result.output and result.report is None
        assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_the_python_api_rejects_a_misspelt_option_before_running():
    import pytest

    import gradaudit
    from gradaudit.findings import ConfigError

    with pytest.raises(ConfigError, match="GA301"):
        gradaudit.audit(options={"GA301.max_amplificaton": 50})


def test_the_library_rejects_a_rule_pattern_that_matches_no_rule():
    import pytest

    import gradaudit
    from gradaudit.findings import ConfigError

    with pytest.raises(ConfigError, match="'GA999': matches no rule"):
        gradaudit.audit(select=["GA999"])
    with pytest.raises(ConfigError, match="'dead-trem': matches no rule"):
        gradaudit.audit(ignore=["dead-trem"])
