"""Program-supplied text (names, expressions, paths, error messages) reaches the terminal escaped, never raw."""

import pytest

from gradaudit.report import build_report, console
from gradaudit.trace import Location
from tests.conftest import fixture_line
from tests.test_console_golden import library_findings, library_trace, rendered

EVIL = "evil\x1b[31m\nGA999 error forged [bold]markup[/bold]\r\t\x9b\u202e"
RAW_CONTROLS = ("\x1b", "\r", "\t", "\x9b", "\u202e")


def forged_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip("│ ").startswith("GA999")]


@pytest.mark.parametrize("width", [80, 120])
def test_control_characters_and_markup_in_names_are_printed_escaped(width):
    trace = library_trace(name=EVIL)
    trace.program = EVIL
    trace.window.note = EVIL
    trace.backwards[0].terms[0].name = EVIL
    trace.chains[0].module = EVIL
    trace.clamps[0].expression = EVIL
    trace.exps[0].location = Location(f"{EVIL}.py", 3)
    trace.optimizers[0].name = EVIL
    text = rendered(build_report(trace, library_findings(name=EVIL)), width)
    assert not any(raw in text for raw in RAW_CONTROLS) and forged_lines(text) == []
    assert text.count("evil\\x1b[31m\\nGA999") >= 10 and "[bold]markup[/bold]" in text


def test_printable_escapes_every_control_character_and_keeps_the_rest():
    assert console.printable("a\x00b\x1b[0m\n\r\t\x7f\x85\u2028\u200b\ufeffc") == (
        "a\\x00b\\x1b[0m\\n\\r\\t\\x7f\\x85\\u2028\\u200b\\ufeffc"
    )
    assert console.printable("critic_1 · términos × grupos [ok]") == "critic_1 · términos × grupos [ok]"


def test_a_module_named_with_escapes_is_reported_escaped(gradaudit_cli):
    result = gradaudit_cli("run", "evil_names.py")
    (finding,) = result.findings("GA201")
    assert finding["subject"] == "model"
    assert finding["location"]["line"] == fixture_line("evil_names.py", "GA201-here")
    assert "model.evil\x1b[31m\nGA999 error forged.weight" in finding["message"]  # the JSON keeps the real name
    assert "\x1b" not in result.output and forged_lines(result.output) == []
    assert "model.evil\\x1b[31m\\nGA999" in result.output


def test_error_messages_are_one_escaped_line(gradaudit_cli):
    result = gradaudit_cli("report", "evil\x1b[31m\nGA999 [red]forged.json")
    assert result.exit_code == 2
    assert result.output.splitlines() == ["gradaudit: error: no trace file at evil\\x1b[31m\\nGA999 [red]forged.json"]
