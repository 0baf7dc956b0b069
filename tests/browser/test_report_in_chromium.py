"""A report in a real headless browser (Debian's chromium via Playwright): it works, links land, names stay text."""

from __future__ import annotations

import pytest

from tests.browser.chromium import CHROMIUM, chromium_page

pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run installs it)"
)

HOSTILE = "<img src=x onerror=alert(1)>"


def in_view(page, selector: str) -> bool:
    return page.eval_on_selector(
        selector,
        "e => { const r = e.getBoundingClientRect();"
        " return r.bottom > 0 && r.top < innerHeight && r.right > 0 && r.left < innerWidth; }",
    )


def test_report_in_chromium(gradaudit_cli, tmp_path):
    report = tmp_path / "report.html"
    result = gradaudit_cli("run", "hostile_names.py", "--html", str(report))
    assert result.exit_code == 1 and report.exists()
    errors: list[str] = []
    dialogs: list[str] = []
    with chromium_page(width=900, height=500) as page:
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")

        assert page.locator("#flow-graph svg g.node").count() >= 3
        assert page.locator("img").count() == 0
        assert page.locator(f"text=heads.{HOSTILE}").count() >= 1
        assert any(HOSTILE in text for text in page.locator("#flow-graph svg text").all_text_contents())

        link = page.locator("a.to-graph").first
        target = "#" + link.get_attribute("href")[1:]
        assert not in_view(page, target)
        link.click()
        page.wait_for_timeout(300)
        assert in_view(page, target)
        assert "flash" in page.eval_on_selector(target, "e => e.getAttribute('class')")

        page.fill("input[data-filter]", "trunk")
        visible = [row for row in page.locator("#parameter-table tbody tr").all() if row.is_visible()]
        assert [row.locator("td").first.text_content() for row in visible] == ["trunk.weight", "trunk.bias"]
        page.click("#parameter-table th:nth-child(6)")
        page.click("#parameter-table th:nth-child(6)")
        assert page.get_attribute("#parameter-table th:nth-child(6)", "data-order") == "descending"

        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert errors == [] and dialogs == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
