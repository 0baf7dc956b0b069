"""Settings: defaults, then `[tool.gradaudit]` of the nearest pyproject.toml that has one, then command-line flags.

```toml
[tool.gradaudit]
select = ["GA1", "GA2", "exploding-chain"]   # codes, code prefixes or names
ignore = ["GA102"]
fail-on = "error"                            # info | warning | error
iterations = 5

[tool.gradaudit.GA301]                       # rule thresholds, as `gradaudit rules GA301` lists them
max_amplification = 50
```
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradaudit.findings import ConfigError, Severity
from gradaudit.rules import options_by_rule, unknown_patterns

__all__ = ["Config", "ConfigError", "find_pyproject", "load_config", "parse_option"]

_TABLE = "[tool.gradaudit]"


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
            select=_known_patterns("--select", select) or self.select,
            ignore=_known_patterns("--ignore", ignore) or self.ignore,
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
    for key, value in table.items():
        if isinstance(value, dict):
            options.update({f"{key}.{name}": option for name, option in value.items()})
        elif key in ("select", "ignore"):
            settings[key] = _rule_patterns(key, value)
        elif key == "fail-on":
            settings["fail_on"] = _severity(value)
        elif key == "iterations":
            settings["iterations"] = _iterations(value)
        else:
            raise ConfigError(
                f"unknown key {key!r} in {_TABLE} (known: select, ignore, fail-on, iterations, "
                "and rule tables such as [tool.gradaudit.GA301])"
            )
    options_by_rule(options)
    return Config(**settings, options=options, source=path)


def _rule_patterns(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key} must be a list of rule codes, prefixes or names, got {value!r}")
    return _known_patterns(key, value)


def _known_patterns(key: str, patterns: Sequence[str]) -> tuple[str, ...]:
    unknown = unknown_patterns(patterns)
    if unknown:
        raise ConfigError(
            f"{key} {', '.join(map(repr, unknown))}: matches no rule (give codes such as GA203, prefixes such as GA2 "
            "or names such as discarded-grad; `gradaudit rules` lists them)"
        )
    return tuple(patterns)


def _severity(value: Any) -> Severity:
    if not isinstance(value, str) or value not in Severity.__members__:
        raise ConfigError(f"fail-on must be one of {', '.join(Severity.__members__)}, got {value!r}")
    return Severity[value]


def _iterations(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"iterations must be a positive integer, got {value!r}")
    return value
