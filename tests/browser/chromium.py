"""Opens gradaudit's HTML reports in Debian's headless chromium through Playwright (no browser download).

Also makes the README's screenshot: `python tests/browser/chromium.py reports/PAGE.html docs/report.png`.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium_page(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A fresh page in headless chromium; raises ImportError without Playwright, RuntimeError without chromium."""
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise RuntimeError("no chromium binary on PATH")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def screenshot(report: Path, png: Path, width: int = 1280, height: int = 1500) -> None:
    """The top of a report (header, findings, the start of the graph) as a PNG."""
    with chromium_page(width, height) as page:
        page.goto(report.resolve().as_uri())
        page.screenshot(path=str(png), full_page=False)


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
