"""The command line: `gradaudit run`, `gradaudit report`, `gradaudit check`, `gradaudit rules`."""

from __future__ import annotations

import contextlib
import enum
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gradaudit import gate
from gradaudit.config import Config, ConfigError, load_config, parse_option
from gradaudit.distributed import alone, current_ranks, merged, share
from gradaudit.findings import Declarations, Finding, Severity
from gradaudit.report import build_report, json_report, sarif
from gradaudit.report import console as console_report
from gradaudit.report.html import write_html
from gradaudit.rules import RULES, rule_by_code, run_rules
from gradaudit.trace import RAW_GRAPH_CAP, Trace, TraceError

if TYPE_CHECKING:
    from gradaudit.capture import Audit
    from gradaudit.runner import Outcome

app = typer.Typer(
    help="Audit the gradient flow of a PyTorch training program.", no_args_is_help=True, add_completion=False
)
stderr = Console(stderr=True, highlight=False)


class FailOn(enum.StrEnum):
    info = "info"
    warning = "warning"
    error = "error"


def fail(message: str) -> NoReturn:
    """One line on stderr and exit 2; the message's control characters and markup are printed as text."""
    stderr.print(f"[bold red]gradaudit: error:[/bold red] {escape(console_report.printable(message))}", soft_wrap=True)
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


def warn(message: str) -> None:
    stderr.print(f"[yellow]gradaudit:[/yellow] {escape(console_report.printable(message))}", soft_wrap=True)


def output_path(path: Path | None, flag: str) -> Path | None:
    """An output file, checked before anything runs: absolute (relative to where gradaudit was started, not to
    where the program ends up), in a folder that exists and is writable; otherwise exit 2."""
    if path is None:
        return None
    absolute = Path(os.path.abspath(path))
    if absolute.is_dir():
        fail(f"{flag} {path}: is a folder, not a file")
    if not absolute.parent.is_dir():
        fail(f"{flag} {path}: the folder {absolute.parent} does not exist")
    if not os.access(absolute.parent, os.W_OK | os.X_OK) or (absolute.exists() and not os.access(absolute, os.W_OK)):
        fail(f"{flag} {path}: not writable")
    return absolute


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failure to write `path` is one line and exit 2."""
    try:
        yield
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")


@dataclass(frozen=True)
class Gate:
    """`--baseline FILE`: the baseline read before anything runs, or, with --update-baseline, the file to write."""

    path: Path
    baseline: gate.Baseline | None
    """None: --update-baseline."""


def gate_settings(path: Path | None, update: bool) -> Gate | None:
    """A damaged, unreadable or future-version baseline (or an unwritable one to update) is exit 2, up front."""
    if path is None:
        if update:
            fail("--update-baseline needs --baseline FILE (the file to write)")
        return None
    if update:
        return Gate(output_path(path, "--baseline"), None)  # type: ignore[arg-type]
    try:
        return Gate(Path(os.path.abspath(path)), gate.read_baseline(path))
    except gate.BaselineError as exc:
        fail(str(exc))


def declared(config: Config, gating: Gate | None, audit: str | None = None) -> Callable[[Trace], Declarations] | None:
    """The declarations the contract and regression rules get: the config's contracts (and `audit`'s), the baseline."""
    contracts = config.contracts
    if audit is not None:
        if audit not in config.audits:
            fail(f"--audit {audit}: no [tool.gradaudit.audits.{audit}] in {config.source or 'any pyproject.toml'}")
        contracts += config.audits[audit].contracts
    return gate.declarations_for(contracts, None if gating is None else gating.baseline)


@dataclass(frozen=True)
class Outputs:
    """What a command writes (paths checked before anything runs) and the severity that fails it."""

    json_path: Path | None
    trace_path: Path | None
    html_path: Path | None
    quiet: bool
    fail_on: Severity
    sarif_path: Path | None = None
    gate: Gate | None = None


def emit(trace: Trace, findings: list[Finding], outputs: Outputs) -> int:
    """Writes the requested outputs; returns the exit code for `fail_on` (on new findings only, with a baseline)."""
    report = build_report(trace, findings)
    gating, failing = outputs.gate, findings
    if gating is not None and gating.baseline is not None:
        comparison = gate.compare(findings, gating.baseline)
        report["baseline"] = gate.comparison_dict(comparison, gating.path)
        failing = comparison.new
    if outputs.trace_path is not None:
        with writing(outputs.trace_path):
            trace.save(outputs.trace_path)
    if outputs.html_path is not None:
        with writing(outputs.html_path):
            write_html(trace, findings, outputs.html_path)
    if outputs.json_path is not None:
        with writing(outputs.json_path), outputs.json_path.open("w") as stream:
            json_report.render(report, stream)
    if outputs.sarif_path is not None:
        with writing(outputs.sarif_path), outputs.sarif_path.open("w") as stream:
            sarif.render(report, stream)
    if not outputs.quiet:
        console_report.render(report, sys.stdout)
    if gating is not None and gating.baseline is None:
        with writing(gating.path):
            gate.write_baseline(gating.path, findings, gate.trace_stats(trace))
        Console(highlight=False).print(f"baseline written: {escape(str(gating.path))} ({len(findings)} finding(s))")
        return 0
    if gating is not None and not outputs.quiet:
        for line in gate.comparison_lines(comparison, gating.path):
            Console(highlight=False, soft_wrap=True).print(escape(console_report.printable(line)))
    return 1 if any(f.severity >= outputs.fail_on for f in failing) else 0


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
HtmlOption = Annotated[
    Path | None, typer.Option("--html", help="write a self-contained HTML report with the gradient-flow graph")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="no console report")]
SarifOption = Annotated[Path | None, typer.Option("--sarif", help="write the findings as SARIF 2.1.0 (code scanning)")]
BaselineOption = Annotated[
    Path | None,
    typer.Option("--baseline", help="fail only on findings not in this baseline; report gradient regressions"),
]
UpdateBaselineOption = Annotated[
    bool, typer.Option("--update-baseline", help="write the --baseline file from this run instead of comparing")
]


@app.command(context_settings={"allow_interspersed_args": True})
def run(
    target: Annotated[
        str | None, typer.Argument(help="the training script or folder (or, with -m, its first argument)")
    ] = None,
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
    light: Annotated[
        bool,
        typer.Option("--light", help="lifecycle and reachability only: no op provenance, term gradients, numerics"),
    ] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="run to the end: audit the window, then one iteration in every --every")
    ] = False,
    every: Annotated[
        int | None,
        typer.Option(
            "--every", min=1, help="with --watch: iterations per light sample (default: chosen so they add <= 10%)"
        ),
    ] = None,
    max_nodes: Annotated[
        int | None, typer.Option("--max-nodes", min=1, help="autograd nodes walked per backward (default 2,000,000)")
    ] = None,
    html_path: HtmlOption = None,
    raw_graph_cap: Annotated[
        int, typer.Option(min=0, help="with --html: largest autograd graph drawn node by node (0: none)")
    ] = RAW_GRAPH_CAP,
    max_terms: Annotated[
        int | None,
        typer.Option("--max-terms", min=1, help="loss terms reported per backward root; the rest are merged into one"),
    ] = None,
    sarif_path: SarifOption = None,
    baseline: BaselineOption = None,
    update_baseline: UpdateBaselineOption = False,
    audit_name: Annotated[
        str | None, typer.Option("--audit", help="also check the contracts of [tool.gradaudit.audits.NAME]")
    ] = None,
) -> None:
    """Run a training program under audit: `gradaudit run train.py -- --lr 3e-4`.

    The program runs as `python train.py` (or `python FOLDER`, `python -m MODULE`) would run it, until the
    audited iterations are complete; gradaudit then stops it and reports. The report says how the program
    ended: stopped by gradaudit, returned, sys.exit or os._exit, an uncaught exception, or Ctrl-C.

    Exit status: 0 no finding at or above --fail-on; 1 findings at or above --fail-on; 2 nothing could be
    audited (bad input or settings, or the program failed before its first training iteration); 130
    interrupted (Ctrl-C, after a partial report). With --baseline, only findings not in the baseline count.
    When the program itself ended with a non-zero status after
    audited iterations (sys.exit(3), os._exit(3); 1 for an uncaught exception or sys.exit("message"), as in
    Python), gradaudit reports what it saw and exits with that status, so a failing program never passes.
    """
    from gradaudit.capture import Audit, InstallError
    from gradaudit.capture.graph import MAX_TERMS
    from gradaudit.runner import ProgramNotFound, run_program

    config = settings(select, ignore, fail_on, option, iterations)
    gating = gate_settings(baseline, update_baseline)
    outputs = Outputs(
        output_path(json_path, "--json"),
        output_path(save_trace, "--save-trace"),
        output_path(html_path, "--html"),
        quiet,
        config.fail_on,
        output_path(sarif_path, "--sarif"),
        gating,
    )
    args = list(script_args or [])
    if module is not None:
        if target is not None:
            args.insert(0, target)
        program, as_module = module, True
    elif target is not None:
        program, as_module = target, False
    else:
        fail("name a script (gradaudit run train.py) or a module (gradaudit run -m package.module)")
    if every is not None and not watch:
        fail("--every sets the pace of --watch: add --watch")
    audit = Audit(
        iterations=config.iterations,
        term_grads=term_grads,
        light=light,
        watch=(every or True) if watch else False,
        **({} if max_nodes is None else {"max_nodes": max_nodes}),
        max_terms=MAX_TERMS if max_terms is None else max_terms,
        select=config.select,
        ignore=config.ignore,
        options=config.options,
        program=program,
        arguments=args,
        raw_graph=html_path is not None,
        raw_graph_cap=raw_graph_cap,
        declarations=declared(config, gating, audit_name),
    )

    def conclude(outcome: Outcome) -> int:
        try:
            return report_outcome(audit, outcome, outputs)
        except typer.Exit as exc:
            return exc.exit_code

    try:
        outcome = run_program(audit, program, args, as_module, conclude)
    except (ProgramNotFound, InstallError) as exc:
        fail(str(exc))
    raise typer.Exit(conclude(outcome))


def report_outcome(audit: Audit, outcome: Outcome, outputs: Outputs) -> int:
    """Reports what was seen and how the program ended; returns the exit status (see `gradaudit run --help`)."""
    recorder = audit.recorder
    if outcome.exit_message:
        sys.stderr.write(outcome.exit_message + "\n")  # as Python prints sys.exit("message")
    if outcome.traceback:
        sys.stderr.write(outcome.traceback)
    if outcome.stopped_by == "interrupted" and not audit.saw_backward:
        warn("the program was interrupted (KeyboardInterrupt) before any backward call: nothing to audit")
        return outcome.status
    stepped = any(o.steps for o in recorder.optimizers.values())
    if (
        outcome.stopped_by == "exception"
        and recorder.iterations + recorder.iterations_before_sample == 0
        and not stepped
    ):
        fail(f"the program {outcome.ending} before completing a training iteration (0 iterations audited)")
    if not audit.saw_backward and outcome.status:
        fail(f"the program exited with status {outcome.status} before any backward call: nothing to audit")
    if not audit.saw_backward:
        seen = ", ".join(
            f"{type(o.optimizer).__name__} '{recorder._label(o)}'" + (f" ({o.created_at})" if o.created_at else "")
            for o in recorder.optimizers.values()
        )
        fail(f"no backward call seen: nothing to audit (optimizers seen: {seen or 'none'})")
    note = how_it_ended(outcome, recorder.iterations + recorder.iterations_before_sample)
    if outcome.status or outcome.ending or outcome.stop_swallowed:
        warn(note)
    audit.finish(outcome.stopped_by, note)
    assert audit.trace is not None
    findings = audit.findings
    ranks = current_ranks()
    if ranks is not None and ranks.rank != 0 and not outcome.status:
        share(ranks, findings)  # rank 0 reports it
        return 0
    if ranks is not None and ranks.rank == 0:
        findings, missing = merged(ranks, findings)
        if missing:
            warn(f"no findings arrived from rank(s) {', '.join(map(str, missing))}: reported are those of the others")
    elif ranks is not None:
        warn(f"rank {ranks.rank} failed: its own findings follow")
        findings = alone(ranks, findings)
    code = emit(audit.trace, findings, outputs)
    return outcome.status or code


def how_it_ended(outcome: Outcome, iterations: int) -> str:
    """The report's note: how the window closed and how the program ended, with the exit status it implies."""
    parts = []
    if outcome.stopped_by == "cap":
        parts.append("window capped: not every optimizer stepped, or backward calls went on without a step")
    if outcome.stop_swallowed:
        parts.append(
            f"the program caught gradaudit's stop after {iterations} iteration(s) and ran on unaudited to its end"
        )
        if outcome.ending:
            parts.append(f"it then {outcome.ending}")
    elif outcome.ending:
        parts.append(f"the program {outcome.ending} after {iterations} iteration(s)")
    if outcome.status:
        parts.append(f"exit status {outcome.status}")
    return "; ".join(parts)


@app.command()
def report(
    trace_path: Annotated[Path, typer.Argument(help="a trace written by --save-trace")],
    json_path: JsonOption = None,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    fail_on: FailOnOption = None,
    option: OptionOption = None,
    quiet: QuietOption = False,
    html_path: HtmlOption = None,
    sarif_path: SarifOption = None,
    baseline: BaselineOption = None,
    update_baseline: UpdateBaselineOption = False,
) -> None:
    """Re-run the rules on a saved trace."""
    config = settings(select, ignore, fail_on, option)
    gating = gate_settings(baseline, update_baseline)
    outputs = Outputs(
        output_path(json_path, "--json"),
        None,
        output_path(html_path, "--html"),
        quiet,
        config.fail_on,
        output_path(sarif_path, "--sarif"),
        gating,
    )
    try:
        trace = Trace.load(trace_path)
    except TraceError as exc:
        fail(str(exc))
    declare = declared(config, gating)
    findings = run_rules(trace, config.select, config.ignore, config.options, declare and declare(trace))
    raise typer.Exit(emit(trace, findings, outputs))


@app.command()
def check(
    names: Annotated[list[str] | None, typer.Argument(help="audits to run (default: all)")] = None,
    sarif_path: SarifOption = None,
    update_baseline: Annotated[
        bool, typer.Option("--update-baseline", help="rewrite each audit's baseline from this run")
    ] = False,
) -> None:
    """Run the audits of [tool.gradaudit.audits] in pyproject.toml, each as its own `gradaudit run`.

    Prints one summary table (with a baseline: + new findings, - fixed ones). Exit status: the worst of the
    audits' (`gradaudit run --help`); 2 when no audit is declared or the settings are bad.
    """
    from gradaudit.check import run_check

    try:
        config = load_config()
        sarif_file = output_path(sarif_path, "--sarif")
        raise typer.Exit(run_check(config, names or [], update_baseline, sarif_file))
    except ConfigError as exc:
        fail(str(exc))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="folder for the HTML reports and index.html")] = Path("reports"),
) -> None:
    """Audit every reference-agent variant: print the findings table, write an HTML report of each and an index."""
    from gradaudit.demo import run_demo

    raise typer.Exit(run_demo(out))


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
