"""The page in headless Debian Chromium (never a downloaded browser): prune, chart, answers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLE

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")
def test_prune_see_chart_and_both_answers(app):
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(app)
        page.get_by_text("prunable by default").wait_for(timeout=60_000)
        page.get_by_label("Wanda", exact=True).first.check()
        page.get_by_role("button", name="Prune", exact=True).click()
        page.get_by_text("achieved sparsity").wait_for(timeout=120_000)
        page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
        assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 1

        page.get_by_role("tab", name="Ask").click()
        page.locator("input[type=file]").first.set_input_files(str(EXAMPLE))
        page.get_by_label("Question (empty: a caption)").first.fill("how many shapes are there?")
        page.get_by_role("button", name="Ask the full and the pruned models").click()
        page.get_by_text("Full model", exact=True).wait_for(timeout=60_000)
        page.get_by_text("Wanda @ 0.50").last.wait_for(timeout=10_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)
        browser.close()
    real = [e for e in errors if "favicon" not in e]
    assert not real, real
