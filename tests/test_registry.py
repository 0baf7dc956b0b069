"""The rule registry: every rule module is registered once, codes and names are unique, rules never import torch."""

import ast
import pkgutil
from pathlib import Path

import gradaudit.rules as rules_package
from gradaudit.rules import RULES


def test_every_rule_module_is_registered_with_matching_identity():
    modules = [m.name for m in pkgutil.iter_modules(rules_package.__path__) if m.name.startswith("ga")]
    registered = {f"{r.code.lower()}_{r.name.replace('-', '_')}" for r in RULES}
    assert sorted(modules) == sorted(registered)
    assert len({r.code for r in RULES}) == len({r.name for r in RULES}) == len(RULES)


def test_rules_do_not_import_torch():
    for path in Path(rules_package.__path__[0]).glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "torch" not in imported, path.name
