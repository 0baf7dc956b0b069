"""The rule catalog. Rules are pure functions of the Trace: they never import torch."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from gradaudit.findings import ConfigError, Declarations, Finding, Rule
from gradaudit.rules import (
    ga101_dead_term,
    ga102_zero_grad_term,
    ga103_term_lost_gradient,
    ga201_orphan_param,
    ga202_unreached_param,
    ga203_discarded_grad,
    ga204_multi_optimizer_param,
    ga205_stale_grad,
    ga206_target_grad,
    ga207_group_lost_gradient,
    ga208_optimizer_changed,
    ga301_exploding_chain,
    ga302_vanishing_chain,
    ga303_saturated_clamp,
    ga304_exp_overflow,
    ga305_nonfinite_grad,
    ga306_term_dominance,
    ga307_grad_norm_shift,
    ga401_missing_route,
    ga402_forbidden_route,
    ga403_wrong_owner,
)
from gradaudit.trace import Trace

RULES: tuple[Rule, ...] = (
    ga101_dead_term.RULE,
    ga102_zero_grad_term.RULE,
    ga103_term_lost_gradient.RULE,
    ga201_orphan_param.RULE,
    ga202_unreached_param.RULE,
    ga203_discarded_grad.RULE,
    ga204_multi_optimizer_param.RULE,
    ga205_stale_grad.RULE,
    ga206_target_grad.RULE,
    ga207_group_lost_gradient.RULE,
    ga208_optimizer_changed.RULE,
    ga301_exploding_chain.RULE,
    ga302_vanishing_chain.RULE,
    ga303_saturated_clamp.RULE,
    ga304_exp_overflow.RULE,
    ga305_nonfinite_grad.RULE,
    ga306_term_dominance.RULE,
    ga307_grad_norm_shift.RULE,
    ga401_missing_route.RULE,
    ga402_forbidden_route.RULE,
    ga403_wrong_owner.RULE,
)


def rule_by_code(code: str) -> Rule | None:
    wanted = code.upper()
    return next((r for r in RULES if r.code == wanted or r.name == code.lower()), None)


def _matches(rule: Rule, patterns: Collection[str]) -> bool:
    """Codes, code prefixes (GA2) or slugs."""
    return any(rule.code.startswith(p.upper()) or rule.name == p.lower() for p in patterns)


def known_patterns(key: str, patterns: Sequence[str]) -> tuple[str, ...]:
    """The patterns, each of which must match a rule: a typo such as GA999 would otherwise select nothing and pass
    a CI gate. `key` names where they came from (--select, ignore, ...)."""
    unknown = [p for p in patterns if not p or not any(_matches(rule, (p,)) for rule in RULES)]
    if unknown:
        raise ConfigError(
            f"{key} {', '.join(map(repr, unknown))}: matches no rule (give codes such as GA203, prefixes such as GA2 "
            "or names such as discarded-grad; `gradaudit rules` lists them)"
        )
    return tuple(patterns)


def options_by_rule(options: Mapping[str, object]) -> dict[str, dict[str, float]]:
    """Each rule's options, `{"GA301.max_amplification": 50}` merged over its defaults; checks rule, name and value."""
    overrides: dict[str, dict[str, object]] = {}
    for key, value in options.items():
        code, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"rule option {key!r} is not CODE.name (e.g. GA301.max_amplification)")
        rule = rule_by_code(code)
        if rule is None:
            raise ConfigError(f"rule option {key!r} names no rule {code!r}; `gradaudit rules` lists them")
        overrides.setdefault(rule.code, {})[name] = value
    return {rule.code: rule.resolve_options(overrides.get(rule.code)) for rule in RULES}


def run_rules(
    trace: Trace,
    select: Collection[str] = (),
    ignore: Collection[str] = (),
    options: Mapping[str, float] | None = None,
    declarations: Declarations | None = None,
) -> list[Finding]:
    """Runs the selected rules; `options` are thresholds qualified by rule code (`GA301.max_amplification`);
    the contract and baseline rules run only with `declarations`."""
    own_options = options_by_rule(options or {})
    findings: list[Finding] = []
    for rule in RULES:
        if (select and not _matches(rule, select)) or (ignore and _matches(rule, ignore)):
            continue
        findings.extend(rule.apply(trace, own_options[rule.code], declarations))
    return sorted(findings, key=lambda f: (-f.severity, f.rule, f.subject))
