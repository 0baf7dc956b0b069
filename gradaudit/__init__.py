"""gradaudit: a gradient-flow auditor for PyTorch training code.

`with gradaudit.audit() as a: ...` watches training steps and reports, with source lines, loss terms that
carry no gradient, parameters whose gradient never reaches an optimizer, gradients wiped or applied twice,
and more (`gradaudit rules`). Importing gradaudit patches nothing.
"""

from gradaudit.findings import Finding, Severity

__all__ = ["Finding", "Severity", "audit"]


def audit(**options):  # noqa: ANN201 - re-exported below once capture is imported lazily
    """Start an audit: `with gradaudit.audit() as a: train_step()`; then `a.findings`, `a.trace`."""
    from gradaudit.capture import Audit

    return Audit(**options)
