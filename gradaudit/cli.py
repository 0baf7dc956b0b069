"""The command line: `gradaudit run`, `gradaudit report`, `gradaudit rules`."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gradaudit.config import Config, ConfigError, load_config, parse_option
from gradaudit.findings import Finding, Severity
from gradaudit.report import build_report, json_report
from gradaudit.report import console as console_report
from gradaudit.rules import RULES, rule_by_code, run_rules
from gradaudit.trace import Trace, TraceError

app = typer.Typer(
    help="Audit the gradient flow of a PyTorch training program.", no_args_is_help=True, add_completion=False
)
stderr = Console(stderr=True, highlight=False)


class FailOn(enum.StrEnum):
    info = "info"
    warning = "warning"
    error = "error"


def fail(message: str) -> NoReturn:
    stderr.print(f"[bold red]gradaudit: error:[/bold red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def settings(
    select: list[str] | None,
    ignore: list[str] | None,
    fail_on: FailOn | None,
    options: list[str] | None,
    iterations: int | None = None,
) -> Config:
    """[tool.gradaudit] of the nearest pyproject.toml, overridden by the flags given; a bad setting is exit 2."""
    try:
        return load_config().override(
            select=_split(select),
            ignore=_split(ignore),
            fail_on=None if fail_on is None else Severity[fail_on.value],
            iterations=iterations,
            options=dict(parse_option(option) for option in options or []),
        )
    except ConfigError as exc:
        fail(str(exc))


def emit(trace: Trace, findings: list[Finding], json_path: Path | None, quiet: bool, fail_on: Severity) -> int:
    """Writes the requested outputs; returns the exit code for `fail_on`."""
    report = build_report(trace, findings)
    if json_path is not None:
        with open(json_path, "w") as stream:
            json_report.render(report, stream)
    if not quiet:
        console_report.render(report, sys.stdout)
    return 1 if any(f.severity >= fail_on for f in findings) else 0


SelectOption = Annotated[list[str] | None, typer.Option("--select", help="only these rules (codes, prefixes, names)")]
IgnoreOption = Annotated[list[str] | None, typer.Option("--ignore", help="skip these rules")]
FailOnOption = Annotated[
    FailOn | None,
    typer.Option("--fail-on", help=f"lowest severity that makes the exit code 1 (default: {Config.fail_on.name})"),
]
OptionOption = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", metavar="CODE.NAME=VALUE", help="a rule threshold, e.g. GA301.max_amplification=50"),
]
JsonOption = Annotated[Path | None, typer.Option("--json", help="write the report as JSON")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="no console report")]


@app.command(context_settings={"allow_interspersed_args": True})
def run(
    target: Annotated[str | None, typer.Argument(help="the training script (or, with -m, its first argument)")] = None,
    script_args: Annotated[list[str] | None, typer.Argument(help="arguments for the program, after --")] = None,
    module: Annotated[str | None, typer.Option("-m", help="run a module as __main__, like python -m")] = None,
    iterations: Annotated[
        int | None,
        typer.Option("--iterations", "-n", min=1, help=f"training iterations to audit (default: {Config.iterations})"),
    ] = None,
    json_path: JsonOption = None,
    save_trace: Annotated[Path | None, typer.Option("--save-trace", help="write the full trace as JSON")] = None,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    fail_on: FailOnOption = None,
    option: OptionOption = None,
    quiet: QuietOption = False,
    term_grads: Annotated[bool, typer.Option(help="measure each loss term's gradient per parameter group")] = True,
    max_terms: Annotated[
        int | None,
        typer.Option("--max-terms", min=1, help="loss terms reported per backward root; the rest are merged into one"),
    ] = None,
) -> None:
    """Run a training program under audit: `gradaudit run train.py -- --lr 3e-4`."""
    from gradaudit.capture import Audit
    from gradaudit.capture.graph import MAX_TERMS
    from gradaudit.runner import ProgramNotFound, run_program

    config = settings(select, ignore, fail_on, option, iterations)
    args = list(script_args or [])
    if module is not None:
        if target is not None:
            args.insert(0, target)
        program, as_module = module, True
    elif target is not None:
        program, as_module = target, False
    else:
        fail("name a script (gradaudit run train.py) or a module (gradaudit run -m package.module)")
    audit = Audit(
        iterations=config.iterations,
        term_grads=term_grads,
        max_terms=MAX_TERMS if max_terms is None else max_terms,
        select=config.select,
        ignore=config.ignore,
        options=config.options,
        program=program,
    )
    try:
        outcome = run_program(audit, program, args, as_module)
    except ProgramNotFound as exc:
        fail(str(exc))
    recorder = audit.recorder
    if outcome.stopped_by == "exception" and recorder.iterations == 0:
        sys.stderr.write(outcome.traceback)
        fail(f"the program raised {outcome.error} before completing a training iteration (0 iterations audited)")
    if not recorder.backwards and outcome.exit_code:
        fail(f"the program exited with status {outcome.exit_code} before any backward call: nothing to audit")
    if not recorder.backwards:
        seen = ", ".join(
            f"{type(o.optimizer).__name__} '{recorder._label(o)}'" + (f" ({o.created_at})" if o.created_at else "")
            for o in recorder.optimizers.values()
        )
        fail(f"no backward call seen: nothing to audit (optimizers seen: {seen or 'none'})")
    note = ""
    if outcome.stopped_by == "exception":
        sys.stderr.write(outcome.traceback)
        note = f"the program raised {outcome.error} after {recorder.iterations} iteration(s); reporting what was seen"
        stderr.print(f"[yellow]gradaudit:[/yellow] {escape(note)}", soft_wrap=True)
    elif outcome.stopped_by == "cap":
        note = "window capped before every optimizer stepped"
    audit.finish(outcome.stopped_by, note)
    assert audit.trace is not None
    if save_trace is not None:
        audit.trace.save(save_trace)
    raise typer.Exit(emit(audit.trace, audit.findings, json_path, quiet, config.fail_on))


@app.command()
def report(
    trace_path: Annotated[Path, typer.Argument(help="a trace written by --save-trace")],
    json_path: JsonOption = None,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    fail_on: FailOnOption = None,
    option: OptionOption = None,
    quiet: QuietOption = False,
) -> None:
    """Re-run the rules on a saved trace."""
    config = settings(select, ignore, fail_on, option)
    try:
        trace = Trace.load(trace_path)
    except TraceError as exc:
        fail(str(exc))
    findings = run_rules(trace, config.select, config.ignore, config.options)
    raise typer.Exit(emit(trace, findings, json_path, quiet, config.fail_on))


@app.command()
def rules(code: Annotated[str | None, typer.Argument(help="a rule code or name, e.g. GA203")] = None) -> None:
    """List the rule catalog, or print one rule's documentation."""
    out = Console(highlight=False)
    if code is None:
        table = Table(title="gradaudit rules")
        for column in ("code", "name", "severity", "what"):
            table.add_column(column)
        for rule in RULES:
            table.add_row(rule.code, rule.name, rule.severity.name, rule.summary)
        out.print(table)
        return
    rule = rule_by_code(code)
    if rule is None:
        fail(f"no rule {code!r}; `gradaudit rules` lists them")
    out.print(f"[bold]{rule.code} {rule.name}[/bold] ({rule.severity.name}): {escape(rule.summary)}\n")
    out.print(f"[bold]Why[/bold]\n{escape(rule.why)}\n")
    out.print(f"[bold]Bad[/bold]\n{escape(rule.bad)}\n")
    out.print(f"[bold]Good[/bold]\n{escape(rule.good)}\n")
    out.print(f"[bold]Fix[/bold]\n{escape(rule.fix)}")
    if rule.options:
        defaults = "\n".join(f"{rule.code}.{name} = {default:g}" for name, default in rule.options.items())
        where = f"set with -o {rule.code}.NAME=VALUE, or in pyproject.toml under [tool.gradaudit.{rule.code}]"
        out.print(f"\n[bold]Options[/bold]\n{defaults}\n{escape(where)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
