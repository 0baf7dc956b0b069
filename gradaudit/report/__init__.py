"""The report: one JSON-able schema that every output format renders (`render(report, stream)`).

Schema (version 2):
- `findings`: list of {rule, name, severity, message, subject, location {file, line} | null, hint}
- `groups`: list of {group, tensors, trainable, grad_norm, optimizers, reached_by}; grad_norm is the norm of the
  last gradient each tensor received in the window (null when it received none)
- `terms`: list of {name, location, constant, groups_reached, grad_norms, coefficient, addends, grads_skipped,
  reach_unknown}, one per distinct term; `addends` > 1 for repeated addends merged into one term (or all those
  beyond the cap on terms), `grads_skipped` says why its gradient was not measured ("" when it was or none was due),
  `reach_unknown` that `groups_reached` may be incomplete
- `notes`: what the audit could not measure or cut short, one line each (walks stopped by the depth limit, terms
  beyond the cap, term gradients skipped)
- `chains`: one per (module, location) of a repeatedly applied module, over the backward passes: {module,
  location, backwards (passes it was seen in), calls, carried (gradient-carrying calls in the longest linked run),
  amplification (end-to-end gradient growth from the last carried call back to the first; the largest over the
  passes), min_amplification (the smallest), per_step, first_share (the first carried call's share of the
  module's parameter gradient), output_norms, param_shares}; the last five are those of the pass with the largest
  amplification, the two lists per call (null: a call without gradient)
- `matrix`: one per backward location, from the last pass there: {backward (location), groups, rows: list of
  {term, location, norms {group: gradient norm of the term alone}}}; a term is absent from a group's norms
  when it does not reach it
- `clamps`: one per (op, location), the pass with the largest saturated fraction: {op, expression, location,
  backwards, lower, upper, elements, saturated, below, above, gate}; fractions in [0, 1]
- `exps`: one per (op, location), maxima over the passes: {op, expression, location, backwards, dtype, max_input,
  max_output, overflow}
- `iterations`, `window` {iterations, stopped_by, note}, `program`, `optimizers`
- `internal_errors`: errors inside gradaudit's own hooks (each skipped one measurement): non-zero, the audit is partial
- `light`: audited in light mode (no op provenance, term gradients, chains or numerics)
- `watch` (whole-run watching, else null): {every [iterations per light sample, the latest when automatic],
  automatic, budget [the share of the run's time light samples may add], iterations [first iteration of each
  sample], full [whether each sample was a full audit], every_per_sample, group_norms {group: [norm or null per
  sample]}, iteration_seconds, sample_seconds [mean plain iteration, mean time a light sample added], cost [estimated
  watched over unwatched run time]}; findings then carry `first_iteration` and `occurrences` (samples it appeared in)

Non-finite numbers are written as the strings "inf", "-inf" and "nan", so the JSON stays strictly valid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradaudit.findings import Finding
from gradaudit.trace import Backward, Chain, Clamp, Exp, Location, Trace, by_site

REPORT_VERSION = 2


def _location(location: Location | None) -> dict | None:
    return None if location is None else {"file": location.file, "line": location.line}


def _chain_row(chains: list[Chain]) -> dict[str, Any]:
    amplifications = [a for a in (chain.amplification() for chain in chains) if a is not None]
    kept = max(chains, key=lambda chain: chain.amplification() or 0.0)
    run = kept.carried_run()
    shares = kept.param_shares()
    return {
        "module": kept.module,
        "location": _location(kept.location),
        "backwards": len({chain.backward for chain in chains}),
        "calls": len(kept.calls),
        "carried": len(run),
        "amplification": kept.amplification(),
        "min_amplification": min(amplifications, default=None),
        "per_step": kept.per_step(),
        "first_share": shares[run[0]] if run else None,
        "output_norms": [call.output_norm for call in kept.calls],
        "param_shares": shares,
    }


def _matrix_entry(backward: Backward) -> dict[str, Any]:
    groups, norms = backward.term_matrix()
    return {
        "backward": _location(backward.location),
        "groups": groups,
        "rows": [
            {"term": term.name, "location": _location(term.location), "norms": norms[term.name]}
            for term in backward.terms
            if term.name in norms
        ],
    }


def _clamp_row(clamps: list[Clamp]) -> dict[str, Any]:
    worst = max(clamps, key=lambda clamp: clamp.saturated)
    selections = [clamp.selection for clamp in clamps if clamp.selection is not None]
    selection = max(selections, key=lambda s: s.zero_share) if selections else None
    return {
        "op": worst.op,
        "expression": worst.expression,
        "location": _location(worst.location),
        "backwards": len({clamp.backward for clamp in clamps}),
        "lower": worst.lower,
        "upper": worst.upper,
        "elements": worst.elements,
        "saturated": worst.saturated,
        "below": worst.below,
        "above": worst.above,
        "gate": worst.gate,
        "selected_dead": selection.zero_share if selection else None,
        "selected_by": _location(selection.location) if selection else None,
    }


def _exp_row(exps: list[Exp]) -> dict[str, Any]:
    largest = max(exps, key=lambda exp: exp.max_input)
    outputs = [exp.max_output for exp in exps if exp.max_output is not None]
    return {
        "op": largest.op,
        "expression": largest.expression,
        "location": _location(largest.location),
        "backwards": len({exp.backward for exp in exps}),
        "dtype": largest.dtype,
        "max_input": largest.max_input,
        "max_output": max(outputs, default=None),
        "overflow": max(exp.overflow for exp in exps),
    }


def _notes(trace: Trace) -> list[str]:
    """What the audit could not see or measure, once per backward location and term."""
    notes: dict[str, None] = {}
    for backward in trace.backwards:
        where = f"the backward at {backward.location}" if backward.location else f"backward #{backward.index}"
        if backward.walk_truncated:
            notes[
                f"{where}: the graph is deeper or larger than gradaudit walks (the node limit is --max-nodes, "
                "audit(max_nodes=N)); loss terms that reach only beyond that are not reported as dead, and the "
                "gradients reaching parameters were read during the backward"
            ] = None
        if backward.terms_beyond_cap:
            notes[
                f"{where}: more loss terms than the cap; {backward.terms_beyond_cap} addends are merged into "
                f"`{backward.terms[-1].name}` (raise it with --max-terms)"
            ] = None
        for term in backward.terms:
            if term.grads_skipped:
                at = f" ({term.location})" if term.location else ""
                notes[f"the gradient of `{term.name}`{at} was not measured on its own: {term.grads_skipped}"] = None
    return list(notes)


def _json_safe(value: Any) -> Any:
    """Non-finite floats as "inf" / "-inf" / "nan": strict JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def build_report(trace: Trace, findings: list[Finding]) -> dict[str, Any]:
    last_norm: dict[str, float] = {}
    for event in trace.events:
        if event.kind == "accumulate" and event.norm is not None:
            last_norm[event.param] = event.norm
    terms: dict[tuple, dict] = {}
    reached_by: dict[str, set[str]] = {}
    last_backward_at: dict[Location | None, Backward] = {}
    for backward in trace.backwards:
        last_backward_at[backward.location] = backward
        for term in backward.terms:
            terms[(term.name, term.location)] = {
                "name": term.name,
                "location": _location(term.location),
                "constant": term.constant,
                "groups_reached": term.groups_reached,
                "grad_norms": term.grad_norms,
                "coefficient": term.coefficient,
                "addends": term.addends,
                "grads_skipped": term.grads_skipped,
                "reach_unknown": term.reach_unknown,
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
    report = {
        "schema": "gradaudit-report",
        "version": REPORT_VERSION,
        "program": trace.program,
        "internal_errors": trace.window.internal_errors,
        "light": trace.light,
        "watch": None if trace.watch is None else dataclasses.asdict(trace.watch),
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
        "notes": _notes(trace),
        "groups": groups,
        "terms": list(terms.values()),
        "chains": [_chain_row(chains) for chains in by_site(trace.chains, lambda c: (c.module, c.location))],
        "matrix": [_matrix_entry(backward) for backward in last_backward_at.values()],
        "clamps": [_clamp_row(clamps) for clamps in by_site(trace.clamps, lambda c: (c.op, c.location))],
        "exps": [_exp_row(exps) for exps in by_site(trace.exps, lambda e: (e.op, e.location))],
    }
    return _json_safe(report)
