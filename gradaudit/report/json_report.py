"""The report as JSON: the schema itself."""

from __future__ import annotations

import json
from typing import Any, TextIO


def render(report: dict[str, Any], stream: TextIO) -> None:
    json.dump(report, stream, indent=2)
    stream.write("\n")
