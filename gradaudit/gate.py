"""The CI gate: a baseline of today's findings and gradient statistics, and what changed since.

A baseline (`--update-baseline`) is small, sorted JSON that diffs well in review:

```json
{"schema": "gradaudit-baseline", "version": 1,
 "findings": [{"fingerprint": "...", "rule": "GA203", "subject": "obs_encoder", "file": "train.py", "text": "..."}],
 "groups": {"critic": {"grad_norm": 1.01, "optimizers": ["critic_optimizer"]}},
 "terms": {"vae_loss": {"grad_norm": 0.0629}}}
```

A finding is matched by its fingerprint: rule, subject, file (its path from the project root, so that the gate can
run from any folder) and the whitespace-normalised source text of its line, read when gradaudit runs, so moving
code or editing unrelated lines keeps it known. `grad_norm` is the median over the window's backward passes
(3 significant digits); the regression rules (GA103, GA207, GA208, GA307) compare a run against them.
"""

from __future__ import annotations

import hashlib
import json
import linecache
import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradaudit.findings import Declarations, Finding
from gradaudit.trace import Location, Trace

BASELINE_SCHEMA = "gradaudit-baseline"
BASELINE_VERSION = 1
MANUAL_UPDATE = "(manual update)"


class BaselineError(ValueError):
    """A baseline file that cannot be used, said in one line."""


@dataclass(frozen=True)
class GroupStats:
    grad_norm: float | None
    """Median gradient norm of the group over the window's backward passes; None: it received none."""
    optimizers: tuple[str, ...] = ()
    """The optimizers that applied its gradient (`(manual update)` for an update by hand)."""


@dataclass(frozen=True)
class Stats:
    """Gradient statistics of one run, per trainable parameter group and per loss term (by printed name)."""

    groups: Mapping[str, GroupStats] = field(default_factory=dict)
    terms: Mapping[str, float | None] = field(default_factory=dict)
    """Median gradient norm of the term alone over its passes; 0: it carries none; None: not measured."""


@dataclass(frozen=True)
class LockedFinding:
    """A finding as a baseline keeps it: what identifies it, not its message's numbers."""

    fingerprint: str
    rule: str
    subject: str
    file: str
    text: str

    def __str__(self) -> str:
        where = f"{self.file}: `{self.text}`" if self.text else self.file or "no location"
        return f"{self.rule} {self.subject} ({where})"


@dataclass(frozen=True)
class Baseline:
    findings: tuple[LockedFinding, ...]
    stats: Stats


@dataclass(frozen=True)
class Comparison:
    """A run's findings against a baseline."""

    new: list[Finding]
    known: list[Finding]
    fixed: list[LockedFinding]


def _rounded(value: float) -> float:
    return float(f"{value:.3g}")


def _median(values: Iterable[float]) -> float | None:
    kept = [v for v in values if math.isfinite(v)]
    return _rounded(statistics.median(kept)) if kept else None


def trace_stats(trace: Trace) -> Stats:
    """Per trainable group: median over backward passes of the group's gradient norm, and who applied it."""
    group_of = {p.name: p.group for p in trace.parameters}
    squares: dict[tuple[str, int], float] = {}
    applied: dict[str, set[str]] = {}
    for event in trace.events:
        group = group_of[event.param]
        if event.kind == "accumulate" and event.backward is not None and event.norm is not None:
            key = (group, event.backward)
            squares[key] = squares.get(key, 0.0) + event.norm**2
        elif event.kind == "apply":
            name = MANUAL_UPDATE if event.optimizer is None else trace.optimizers[event.optimizer].name
            applied.setdefault(group, set()).add(name)
    per_group: dict[str, list[float]] = {}
    for (group, _), square in squares.items():
        per_group.setdefault(group, []).append(math.sqrt(square))
    groups = {
        group: GroupStats(_median(per_group.get(group, [])), tuple(sorted(applied.get(group, ()))))
        for group, params in trace.groups().items()
        if any(p.requires_grad for p in params)
    }
    term_norms: dict[str, list[float]] = {}
    unmeasured: set[str] = set()
    for backward in trace.backwards:
        for term in backward.terms:
            if term.constant or not term.groups_reached:
                term_norms.setdefault(term.name, []).append(0.0)
            elif term.grad_norms:
                term_norms.setdefault(term.name, []).append(math.sqrt(sum(n * n for n in term.grad_norms.values())))
            else:
                unmeasured.add(term.name)
    terms: dict[str, float | None] = {name: None for name in unmeasured}
    terms.update({name: _median(norms) for name, norms in term_norms.items()})
    return Stats(groups, terms)


def source_text(file: str, line: int) -> str:
    """The line's source, whitespace-normalised; "" when the file cannot be read (a path relative to the cwd)."""
    return " ".join(linecache.getline(os.path.abspath(file), line).split())


_PROJECT_MARKERS = (".git", "pyproject.toml", "setup.cfg", "setup.py")


def project_path(file: str) -> str:
    """The file's path from the root of the project holding it (the nearest folder above it with a `.git` or
    `pyproject.toml`), so that a baseline matches wherever the gate is run from; the path as given when the file is
    not found (an installed package's `stable_baselines3/ppo/ppo.py`) or belongs to no project."""
    absolute = Path(os.path.abspath(file))
    if not absolute.is_file():
        return file
    for folder in absolute.parents:
        if any((folder / marker).exists() for marker in _PROJECT_MARKERS):
            return absolute.relative_to(folder).as_posix()
    return file


def fingerprint(rule: str, subject: str, location: Location | None) -> LockedFinding:
    file, text = (
        ("", "") if location is None else (project_path(location.file), source_text(location.file, location.line))
    )
    digest = hashlib.sha256("\x1f".join((rule, subject, file, text)).encode()).hexdigest()[:16]
    return LockedFinding(digest, rule, subject, file, text)


def lock(finding: Finding) -> LockedFinding:
    return fingerprint(finding.rule, finding.subject, finding.location)


def compare(findings: Sequence[Finding], baseline: Baseline) -> Comparison:
    """Matches findings to the baseline's by fingerprint, as multisets (two identical findings need two entries)."""
    remaining = Counter(locked.fingerprint for locked in baseline.findings)
    new, known = [], []
    for finding in findings:
        key = lock(finding).fingerprint
        if remaining[key] > 0:
            remaining[key] -= 1
            known.append(finding)
        else:
            new.append(finding)
    fixed = []
    for locked in baseline.findings:
        if remaining[locked.fingerprint] > 0:
            remaining[locked.fingerprint] -= 1
            fixed.append(locked)
    return Comparison(new, known, fixed)


def declarations_for(contracts: Sequence[Any], baseline: Baseline | None) -> Callable[[Trace], Declarations] | None:
    """What the declared rules get for a trace (None when nothing is declared): the backward lines' source is read
    here, at run time, so that a contract can name a loss by its variable."""
    if not contracts and baseline is None:
        return None

    def declare(trace: Trace) -> Declarations:
        lines = {
            str(b.location): source_text(b.location.file, b.location.line)
            for b in trace.backwards
            if b.location is not None
        }
        return Declarations(tuple(contracts), None if baseline is None else baseline.stats, lines)

    return declare


def baseline_dict(findings: Sequence[Finding], stats: Stats) -> dict[str, Any]:
    locked = sorted((lock(f) for f in findings), key=lambda f: (f.file, f.rule, f.subject, f.text, f.fingerprint))
    return {
        "schema": BASELINE_SCHEMA,
        "version": BASELINE_VERSION,
        "findings": [vars(f) for f in locked],
        "groups": {
            name: {"grad_norm": group.grad_norm, "optimizers": list(group.optimizers)}
            for name, group in sorted(stats.groups.items())
        },
        "terms": {name: {"grad_norm": norm} for name, norm in sorted(stats.terms.items())},
    }


def write_baseline(path: Path, findings: Sequence[Finding], stats: Stats) -> None:
    path.write_text(json.dumps(baseline_dict(findings, stats), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_baseline(path: Path) -> Baseline:
    """The baseline at `path`; missing, unreadable, damaged or of a later version: BaselineError."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineError(f"no baseline at {path} (write one with --update-baseline)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BaselineError(f"{path} is not a readable baseline JSON file ({exc})") from None
    if not isinstance(raw, dict) or raw.get("schema") != BASELINE_SCHEMA:
        raise BaselineError(f'{path} is not a gradaudit baseline (no "schema": "{BASELINE_SCHEMA}")')
    if raw.get("version") != BASELINE_VERSION:
        raise BaselineError(
            f"{path} is a gradaudit baseline of version {raw.get('version')!r}; this gradaudit reads version "
            f"{BASELINE_VERSION} (rewrite it with --update-baseline)"
        )
    try:
        findings = tuple(
            LockedFinding(*(_text(item[key]) for key in ("fingerprint", "rule", "subject", "file", "text")))
            for item in raw["findings"]
        )
        groups = {
            _text(name): GroupStats(_norm(group["grad_norm"]), tuple(_text(o) for o in group["optimizers"]))
            for name, group in raw["groups"].items()
        }
        terms = {_text(name): _norm(term["grad_norm"]) for name, term in raw["terms"].items()}
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise BaselineError(f"{path} is a damaged gradaudit baseline ({type(exc).__name__}: {exc})") from None
    return Baseline(findings, Stats(groups, terms))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _norm(value: Any) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
        raise ValueError(f"expected a gradient norm or null, got {value!r}")
    return None if value is None else float(value)


def comparison_lines(comparison: Comparison, path: Path | str) -> list[str]:
    """The diff against the baseline, as the console prints it: `+` new findings, `-` fixed ones."""
    lines = [
        f"baseline {path}: {len(comparison.new)} new, {len(comparison.known)} known, {len(comparison.fixed)} fixed"
    ]
    lines += [
        f"  + {f.rule} {f.name} {f.subject}" + (f" at {f.location}" if f.location else "") for f in comparison.new
    ]
    lines += [f"  - fixed: {locked}" for locked in comparison.fixed]
    return lines


def comparison_dict(comparison: Comparison, path: Path | str) -> dict[str, Any]:
    """The `baseline` section of the JSON report."""
    return {
        "path": str(path),
        "new": [{**vars(lock(f)), "line": None if f.location is None else f.location.line} for f in comparison.new],
        "known": [lock(f).fingerprint for f in comparison.known],
        "fixed": [vars(locked) for locked in comparison.fixed],
    }
