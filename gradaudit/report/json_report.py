"""The report as JSON: the schema itself, strictly valid (build_report already wrote non-finite numbers as strings)."""

from __future__ import annotations

import json
from typing import Any, TextIO


def render(report: dict[str, Any], stream: TextIO) -> None:
    json.dump(report, stream, indent=2, allow_nan=False)
    stream.write("\n")
