"""The Prune tab's controls in headless Debian Chromium: a method is chosen as its two choices,
and the page shows exactly the settings that method reads (judged by each element's box, not
Playwright's `visible`, which counts an element clipped to nothing as visible)."""

from __future__ import annotations

import shutil

import pytest

from conftest import choose_method
from ecoflap.methods import METHODS, stage2_for, variants
from ecoflap.options import applicable

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed"), pytest.mark.slow]
# each PruneOptions field the tab offers, by the element that holds it
BOXES = {"granularity": "prune-granularity", "max_sparsity": "prune-max-sparsity",
         "stage1_samples": "prune-stage1-samples", "eps": "prune-eps", "nm": "prune-nm", "samples": "prune-samples",
         "batch_size": "prune-batch-size", "include": "prune-modules", "vision_sparsity": "prune-vision-sparsity",
         "owl_m": "prune-owl-m", "owl_lambda": "prune-owl-lambda", "loss": "calibration-data"}
# every method, in an order that moves between allocations and back
ORDER = ["owl", "magnitude", "ecoflap_first", "global_magnitude", "per_modality_sparsegpt", "ecoflap_zeroth_group",
         "sparsegpt", "ecoflap_sparsegpt", "per_modality", "wanda", "owl_sparsegpt", "ecoflap_zeroth"]


@pytest.fixture(params=[1400])
def page(app, request):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": request.param, "height": 1000})
        page.goto(app)
        page.get_by_text("prunable by default").wait_for(timeout=60_000)
        yield page
        browser.close()


def has_box(page, elem_id: str) -> bool:
    return page.evaluate("id => { const e = document.getElementById(id); if (!e) return false; "
                         "const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; }", elem_id)


def values(page, group: str) -> list[str]:
    return page.locator(f"#{group} input[type=radio]").evaluate_all("inputs => inputs.map(i => i.value)")


def value_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


def set_sparsity(page, value: float):
    box = page.locator("#prune-sparsity input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_choosing_a_method_shows_exactly_the_options_it_reads(page):
    assert sorted(ORDER) == sorted(METHODS)
    page.locator("#prune-advanced").get_by_text("Advanced").click()
    page.locator("#prune-samples").wait_for(timeout=10_000)
    for name in ORDER:
        method = METHODS[name]
        choose_method(page, name)
        used = applicable(method)
        page.wait_for_function("ids => ids.every(([id, want]) => { const e = document.getElementById(id); "
                               "const r = e && e.getBoundingClientRect(); return !!(r && r.width > 0 && r.height > 0)"
                               " === want; })", arg=[[i, f in used] for f, i in BOXES.items()], timeout=10_000)
        shown = {field for field, elem_id in BOXES.items() if has_box(page, elem_id)}
        assert shown == set(BOXES) & used, name
        assert values(page, "prune-stage2") == stage2_for(method.allocation), name
        kinds = [v.name for v in variants(method.allocation, method.stage2)]
        assert has_box(page, "prune-variant") == (len(kinds) > 1), name
        if len(kinds) > 1:
            assert values(page, "prune-variant") == kinds, name
    assert not has_box(page, "prune-method")  # the API's method name is set by the choices, not shown


def test_defaults_show_their_values_and_follow_the_sparsity_until_set(page):
    page.locator("#prune-advanced").get_by_text("Advanced").click()
    choose_method(page, "ecoflap_zeroth")
    assert float(value_of(page, "prune-max-sparsity")) == pytest.approx(0.6)  # 0.5 + 0.1, not "0"
    assert value_of(page, "prune-stage1-samples") == "32"
    set_sparsity(page, 0.7)
    page.wait_for_function("() => document.querySelector('#prune-max-sparsity input').value === '0.8'",
                           timeout=10_000)
    page.locator("#prune-max-sparsity input").fill("0.9")
    set_sparsity(page, 0.6)
    page.wait_for_timeout(1_000)  # the slider's change has been answered: the typed cap stays
    assert value_of(page, "prune-max-sparsity") == "0.9"
    choose_method(page, "ecoflap_first")
    assert value_of(page, "prune-stage1-samples") == "128"
    page.locator("#prune-stage1-samples input").fill("50")
    choose_method(page, "ecoflap_zeroth")
    assert value_of(page, "prune-stage1-samples") == "50"
    choose_method(page, "per_modality")
    assert value_of(page, "prune-vision-sparsity") == "0.60"
    choose_method(page, "global_magnitude")
    page.get_by_role("button", name="Prune", exact=True).click()
    page.get_by_text("Global magnitude @ 0.60 done").wait_for(timeout=180_000)
    title = page.locator("#prune-chart .gtitle", has_text="Global magnitude @ 0.60")  # a single run's chart names it
    title.wait_for(timeout=30_000)
    assert title.text_content().startswith("Sparsity of each prunable layer:")  # an SVG text, two lines


FITS = """id => { const c = document.getElementById(id); const p = c && c.querySelector('.js-plotly-plot');
    const t = c && c.querySelector('.gtitle'); if (!p || !p._fullLayout || !t) return false;
    const box = c.getBoundingClientRect(), title = t.getBoundingClientRect();
    return p._fullLayout.width <= box.width && title.right <= box.right && title.left >= box.left; }"""


def wait_until_it_fits(page, chart: str):
    """The chart is drawn at its box's width, its title inside it (not cut at the edge)."""
    page.wait_for_function(FITS, arg=chart, timeout=15_000)


@pytest.mark.parametrize("page", [390], indirect=True)
def test_a_phone_sees_every_tab_and_whole_charts(page):
    """At 390 px every tab is on the page (wrapped to a second row, not behind a menu), and a
    chart drawn while its tab was hidden is redrawn at the phone's width, its title wrapped."""
    for tab in ["Prune", "Recover", "Ask", "Why", "Teach", "Sweep", "Export"]:
        box = page.get_by_role("tab", name=tab).bounding_box()
        assert box and box["width"] > 0 and box["x"] >= 0 and box["x"] + box["width"] <= 390, tab
    assert page.locator("button[aria-label='More tabs']").count() == 0
    page.get_by_role("tab", name="Teach").click()
    wait_until_it_fits(page, "teach-curve")
    page.get_by_role("tab", name="Prune").click()
    choose_method(page, "global_magnitude")
    page.get_by_role("button", name="Prune", exact=True).click()
    page.get_by_text("Global magnitude @ 0.50 done").wait_for(timeout=180_000)
    page.locator("#prune-chart .gtitle", has_text="Global magnitude @ 0.50").wait_for(timeout=30_000)
    wait_until_it_fits(page, "prune-chart")
    # a comparison on Teach ticks its runs in Prune's overlay, which redraws Prune's chart hidden
    page.get_by_role("tab", name="Teach").click()
    boxes = page.locator("#teach-methods")
    for box in boxes.locator("input[type=checkbox]").all():
        if box.is_checked():
            box.uncheck()
    for name in ("Magnitude", "Global magnitude"):
        boxes.get_by_label(name, exact=True).check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_text("Compared 2 methods").wait_for(timeout=300_000)
    page.locator("#overlay-runs").get_by_label("Global magnitude @ 0.60", exact=True).wait_for(state="attached",
                                                                                             timeout=30_000)
    page.get_by_role("tab", name="Prune").click()
    page.locator("#prune-chart .legendtext", has_text="Global magnitude @ 0.60").wait_for(timeout=30_000)
    wait_until_it_fits(page, "prune-chart")
    page.locator("#prune-chart .nsewdrag").first.hover()  # a touch is a hover: the toolbar stays off the title
    assert page.locator("#prune-chart .modebar-container").evaluate_all(
        "bars => bars.every(b => { const r = b.getBoundingClientRect(); return r.width == 0 || r.height == 0; })")
