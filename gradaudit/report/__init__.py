"""The report: one JSON-able schema that every output format renders (`render(report, stream)`).

Schema (version 1):
- `findings`: list of {rule, name, severity, message, subject, location {file, line} | null, hint}
- `groups`: list of {group, tensors, grad_norm, optimizers, reached_by}; grad_norm is the norm of the last
  gradient each tensor received in the window (null when it received none)
- `terms`: list of {name, location, constant, groups_reached, grad_norms, coefficient}, one per distinct term
- `iterations`, `window` {iterations, stopped_by, note}, `program`, `optimizers`
"""

from __future__ import annotations

import math
from typing import Any

from gradaudit.findings import Finding
from gradaudit.trace import Location, Trace

REPORT_VERSION = 1


def _location(location: Location | None) -> dict | None:
    return None if location is None else {"file": location.file, "line": location.line}


def build_report(trace: Trace, findings: list[Finding]) -> dict[str, Any]:
    last_norm: dict[str, float] = {}
    for event in trace.events:
        if event.kind == "accumulate" and event.norm is not None:
            last_norm[event.param] = event.norm
    terms: dict[tuple, dict] = {}
    reached_by: dict[str, set[str]] = {}
    for backward in trace.backwards:
        for term in backward.terms:
            terms[(term.name, term.location)] = {
                "name": term.name,
                "location": _location(term.location),
                "constant": term.constant,
                "groups_reached": term.groups_reached,
                "grad_norms": term.grad_norms,
                "coefficient": term.coefficient,
            }
            for group in term.groups_reached:
                reached_by.setdefault(group, set()).add(term.name)
    groups = []
    for group, params in trace.groups().items():
        norms = [last_norm[p.name] for p in params if p.name in last_norm]
        owners = sorted({i for p in params for i in p.owners})
        groups.append(
            {
                "group": group,
                "tensors": len(params),
                "trainable": any(p.requires_grad for p in params),
                "grad_norm": math.sqrt(sum(n * n for n in norms)) if norms else None,
                "optimizers": [trace.optimizers[i].name for i in owners],
                "reached_by": sorted(reached_by.get(group, ())),
            }
        )
    return {
        "schema": "gradaudit-report",
        "version": REPORT_VERSION,
        "program": trace.program,
        "iterations": trace.window.iterations,
        "window": {
            "iterations": trace.window.iterations,
            "stopped_by": trace.window.stopped_by,
            "note": trace.window.note,
        },
        "optimizers": [
            {"name": o.name, "kind": o.kind, "steps": o.steps, "created_at": _location(o.created_at)}
            for o in trace.optimizers
        ],
        "findings": [f.to_dict() for f in findings],
        "groups": groups,
        "terms": list(terms.values()),
    }
