"""Settings: defaults, then `[tool.gradaudit]` of the nearest pyproject.toml that has one, then command-line flags.

```toml
[tool.gradaudit]
select = ["GA1", "GA2", "exploding-chain"]   # codes, code prefixes or names
ignore = ["GA102"]
fail-on = "error"                            # info | warning | error
iterations = 5

contracts = [{ loss = "critic_loss", reaches = ["obs_encoder"] }]   # gradient contracts (gradaudit/contracts.py)

[tool.gradaudit.GA301]                       # rule thresholds, as `gradaudit rules GA301` lists them
max_amplification = 50

[tool.gradaudit.audits.ppo]                  # what `gradaudit check` runs, each as its own `gradaudit run`
script = "train.py"                          # or module = "package.train"
args = ["--env", "CartPole-v1"]
iterations = 3
baseline = "gradaudit-baseline.json"         # relative to this file
contracts = [{ group = "encoder", stepped-by = "optimizer" }]
```
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradaudit.contracts import Contract, header_line, parse_contracts
from gradaudit.findings import ConfigError, Severity
from gradaudit.rules import known_patterns, options_by_rule

__all__ = ["AuditSpec", "Config", "ConfigError", "find_pyproject", "load_config", "parse_option"]

_TABLE = "[tool.gradaudit]"
_AUDIT_KEYS = ("script", "module", "args", "iterations", "baseline", "contracts")


@dataclass(frozen=True)
class AuditSpec:
    """One audit of `[tool.gradaudit.audits]`: a program and what to hold it to."""

    name: str
    program: str
    as_module: bool
    args: tuple[str, ...] = ()
    iterations: int | None = None
    baseline: Path | None = None
    contracts: tuple[Contract, ...] = ()
    folder: Path = Path()
    """The pyproject.toml's folder: the audit runs there."""


@dataclass(frozen=True)
class Config:
    """What to check and when to fail, for one `gradaudit run` or `gradaudit report`."""

    select: tuple[str, ...] = ()
    """Only these rules (codes, code prefixes such as GA2, or names); empty: all."""
    ignore: tuple[str, ...] = ()
    """Skip these rules."""
    fail_on: Severity = Severity.warning
    """The lowest severity that makes the exit code 1."""
    iterations: int = 3
    """Training iterations `gradaudit run` audits."""
    options: Mapping[str, float] = field(default_factory=dict)
    """Rule thresholds qualified by rule code: {"GA301.max_amplification": 50.0}."""
    source: Path | None = None
    """The pyproject.toml these settings were read from; None: defaults."""
    contracts: tuple[Contract, ...] = ()
    """Gradient contracts for every run."""
    audits: Mapping[str, AuditSpec] = field(default_factory=dict)
    """What `gradaudit check` runs, by name."""

    def override(
        self,
        select: Sequence[str] = (),
        ignore: Sequence[str] = (),
        fail_on: Severity | None = None,
        iterations: int | None = None,
        options: Mapping[str, float] | None = None,
    ) -> Config:
        """Command-line flags win: a given list replaces the file's, options are merged key by key."""
        merged_options = {**self.options, **(options or {})}
        options_by_rule(merged_options)
        return dataclasses.replace(
            self,
            select=known_patterns("--select", select) or self.select,
            ignore=known_patterns("--ignore", ignore) or self.ignore,
            fail_on=self.fail_on if fail_on is None else fail_on,
            iterations=self.iterations if iterations is None else iterations,
            options=merged_options,
        )


def parse_option(text: str) -> tuple[str, float]:
    """`GA301.max_amplification=50` (the `--option` flag) -> ("GA301.max_amplification", 50.0)."""
    key, equals, value = text.partition("=")
    if not equals or "." not in key:
        raise ConfigError(f"--option {text!r} is not CODE.NAME=VALUE (e.g. GA301.max_amplification=50)")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise ConfigError(f"--option {text!r}: {value.strip()!r} is not a number") from None


def find_pyproject(start: Path) -> tuple[Path, dict[str, Any]] | None:
    """The first pyproject.toml from `start` up to the filesystem root that has a [tool.gradaudit] table, and it."""
    for folder in (start, *start.parents):
        path = folder / "pyproject.toml"
        if not path.is_file():
            continue
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path} is not a readable TOML file ({exc})") from None
        tool = document.get("tool")
        if isinstance(tool, dict) and "gradaudit" in tool:
            return path, tool["gradaudit"]
    return None


def load_config(start: Path | None = None) -> Config:
    """Defaults, overridden by the nearest [tool.gradaudit] from `start` (the working directory) upward."""
    found = find_pyproject((start or Path.cwd()).resolve())
    if found is None:
        return Config()
    path, table = found
    try:
        return _from_table(table, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _from_table(table: Any, path: Path) -> Config:
    if not isinstance(table, dict):
        raise ConfigError(f"{_TABLE} must be a table, got {table!r}")
    settings: dict[str, Any] = {}
    options: dict[str, Any] = {}
    text = path.read_text(encoding="utf-8")
    display = _display(path)
    for key, value in table.items():
        if key == "contracts":
            settings["contracts"] = parse_contracts(value, text, header_line(text, ("tool", "gradaudit")), display)
        elif key == "audits":
            settings["audits"] = _audits(value, text, path, display)
        elif isinstance(value, dict):
            options.update({f"{key}.{name}": option for name, option in value.items()})
        elif key in ("select", "ignore"):
            settings[key] = _rule_patterns(key, value)
        elif key == "fail-on":
            settings["fail_on"] = _severity(value)
        elif key == "iterations":
            settings["iterations"] = _iterations(value)
        else:
            raise ConfigError(
                f"unknown key {key!r} in {_TABLE} (known: select, ignore, fail-on, iterations, contracts, audits, "
                "and rule tables such as [tool.gradaudit.GA301])"
            )
    options_by_rule(options)
    return Config(**settings, options=options, source=path)


def _rule_patterns(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key} must be a list of rule codes, prefixes or names, got {value!r}")
    return known_patterns(key, value)


def _severity(value: Any) -> Severity:
    if not isinstance(value, str) or value not in Severity.__members__:
        raise ConfigError(f"fail-on must be one of {', '.join(Severity.__members__)}, got {value!r}")
    return Severity[value]


def _iterations(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"iterations must be a positive integer, got {value!r}")
    return value


def _display(path: Path) -> str:
    """The path as findings show files: relative to the working directory when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _audits(value: Any, text: str, path: Path, display: str) -> dict[str, AuditSpec]:
    if not isinstance(value, dict) or not all(isinstance(spec, dict) for spec in value.values()):
        raise ConfigError(f"audits must be tables such as [tool.gradaudit.audits.NAME], got {value!r}")
    return {name: _audit(name, spec, text, path, display) for name, spec in value.items()}


def _audit(name: str, spec: dict[str, Any], text: str, path: Path, display: str) -> AuditSpec:
    where = f"audit {name!r}"
    unknown = sorted(set(spec) - set(_AUDIT_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_AUDIT_KEYS)})")
    if ("script" in spec) == ("module" in spec):
        raise ConfigError(f"{where} needs exactly one of script or module")
    program = spec.get("script", spec.get("module"))
    args = spec.get("args", [])
    baseline = spec.get("baseline")
    if not isinstance(program, str) or not program:
        raise ConfigError(f"{where}: script or module must be a name, got {program!r}")
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise ConfigError(f"{where}: args must be a list of strings, got {args!r}")
    if baseline is not None and (not isinstance(baseline, str) or not baseline):
        raise ConfigError(f"{where}: baseline must be a path, got {baseline!r}")
    start = header_line(text, ("tool", "gradaudit", "audits", name))
    return AuditSpec(
        name,
        program,
        "module" in spec,
        tuple(args),
        None if "iterations" not in spec else _iterations(spec["iterations"]),
        None if baseline is None else path.parent / baseline,
        parse_contracts(spec.get("contracts", []), text, start, display),
        path.parent,
    )
