"""A class in front of the screen, in headless Debian Chromium: the first job's progress is
on screen (not clipped in an empty box), every refusal is one calm message with the page
left as it was, and a stop keeps what finished, with everything shown belonging together."""

from __future__ import annotations

import re
import shutil

import pytest

from conftest import choose_method, when_running

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed"),
              pytest.mark.slow]
TRACKER = "[data-testid=status-tracker]"


@pytest.fixture
def page(app):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app)
        page.get_by_text("prunable by default").wait_for(timeout=60_000)
        yield page
        browser.close()


def at_sparsity(page, value: str):
    """The Teach tab's sparsity. Identical prunes are shared across the app's sessions, so a
    test that must see a comparison compute picks a sparsity no other test compares at."""
    box = page.locator("#teach-sparsity input[type=number]")
    box.fill(value)
    box.press("Enter")


def choose(page, group: str, methods: list[str]):
    boxes = page.locator(f"#{group}")
    for box in boxes.locator("input[type=checkbox]").all():
        if box.is_checked():
            box.uncheck()
    for name in methods:
        boxes.get_by_label(name, exact=True).check()


def progress_on_screen(page, status: str):
    """The progress tracker of a status box: a real box inside the viewport, and on top
    there (Playwright calls an element clipped to nothing "visible", so ask the page)."""
    tracker = page.locator(f"#{status} {TRACKER} .progress-level")
    tracker.wait_for(state="attached", timeout=60_000)
    seen = page.evaluate("""(sel) => {
        const e = document.querySelector(sel);
        if (!e) return null;
        const r = e.getBoundingClientRect();
        const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
        return {height: r.height, width: r.width, top: r.top, bottom: r.bottom, left: r.left, right: r.right,
                vh: window.innerHeight, vw: window.innerWidth,
                onTop: !!(top && top.closest('[data-testid=status-tracker]') === e.closest('[data-testid=status-tracker]')),
                text: e.textContent};
    }""", f"#{status} {TRACKER} .progress-level")
    assert seen is not None, "the progress went away before it could be measured"
    assert seen["height"] > 0 and seen["width"] > 0, seen
    assert 0 <= seen["top"] and seen["bottom"] <= seen["vh"] and 0 <= seen["left"] and seen["right"] <= seen["vw"], seen
    assert seen["onTop"], seen
    return seen["text"]


def assert_calm(page):
    """No error toast and no "Error" badge anywhere on the page."""
    assert page.locator(".toast-body.error").count() == 0
    assert page.get_by_text("Error", exact=True).count() == 0


def wait_idle(page, status: str):
    page.locator(f"#{status} {TRACKER} .progress-level").wait_for(state="detached", timeout=120_000)


def chart_traces(page, chart: str) -> list[str]:
    """The names of a chart's traces (plotly hides the legend of a single trace)."""
    return page.evaluate(f"() => document.querySelector('#{chart} .js-plotly-plot').data.map(t => t.name)")


def test_the_first_compare_and_sweep_show_their_progress(page):
    page.get_by_role("tab", name="Sweep").click()
    choose(page, "sweep-methods", ["Magnitude"])
    page.get_by_label("Sparsities").fill("0.3")
    page.get_by_role("button", name="Run sweep").click()
    assert "point 1 of 1" in progress_on_screen(page, "sweep-status")
    page.locator("#sweep-stop").click()
    wait_idle(page, "sweep-status")

    page.get_by_role("tab", name="Teach").click()
    choose(page, "teach-methods", ["Magnitude", "Wanda"])
    at_sparsity(page, "0.65")
    compare = page.get_by_role("button", name="Compare", exact=True)
    compare.evaluate("e => e.scrollIntoView({block: 'center'})")  # where a person looks at the button
    compare.click()
    assert "@ 0.65" in progress_on_screen(page, "teach-status")
    page.locator("#teach-stop").click()
    wait_idle(page, "teach-status")
    assert_calm(page)


def toast(page, text: str):
    page.locator(".toast-body", has_text=re.compile(text, re.I)).first.wait_for(timeout=30_000)
    for close in page.locator(".toast-close").all():
        close.click()


def test_every_refusal_is_one_calm_message_and_the_page_stays(page):
    header = page.locator("#model-info").inner_text()
    page.get_by_text("Load another model").click()
    page.get_by_label("Hub id").fill("/etc")
    page.get_by_role("button", name="Load", exact=True).click()
    toast(page, "from the Hugging Face hub by id")
    assert page.locator("#model-info").inner_text() == header
    assert_calm(page)

    page.get_by_role("tab", name="Prune").click()
    choose_method(page, "per_modality")
    page.get_by_text("Advanced").click()
    page.locator("#prune-vision-sparsity textarea, #prune-vision-sparsity input").first.fill("abc")
    page.get_by_role("button", name="Prune", exact=True).click()
    toast(page, "vision sparsity")
    assert "Pick a method and a sparsity" in page.locator("#prune-status").inner_text()
    assert_calm(page)

    page.get_by_role("tab", name="Ask").click()
    page.get_by_role("button", name="Ask the full and the pruned models").click()
    toast(page, "upload an image")
    assert_calm(page)

    page.get_by_role("tab", name="Teach").click()
    choose(page, "teach-methods", ["Magnitude", "Wanda", "SparseGPT", "OWL", "Global magnitude"])
    page.get_by_role("button", name="Compare", exact=True).click()
    toast(page, "two to four different methods")
    assert "Choose methods" in page.locator("#teach-status").inner_text()
    assert_calm(page)

    page.get_by_role("tab", name="Sweep").click()
    page.get_by_label("Sparsities").fill("0.5,,0.6")
    page.get_by_role("button", name="Run sweep").click()
    toast(page, "empty")
    page.get_by_label("Sparsities").fill("0.5,0.5")
    page.get_by_role("button", name="Run sweep").click()
    toast(page, "only once")
    assert "Choose methods" in page.locator("#sweep-status").inner_text()
    assert_calm(page)

    page.get_by_role("tab", name="Export").click()
    page.get_by_role("button", name="Export", exact=True).click()
    toast(page, "no run with that id")
    assert_calm(page)


def test_a_stop_keeps_what_finished_and_what_is_shown_belongs_together(page):
    page.get_by_role("tab", name="Sweep").click()
    choose(page, "sweep-methods", ["Magnitude"])
    page.get_by_label("Sparsities").fill("0.3,0.5,0.7")
    page.get_by_role("button", name="Run sweep").click()
    page.locator(f"#sweep-status {TRACKER}", has_text="point 2 of 3").wait_for(timeout=180_000)
    page.locator("#sweep-stop").click()
    # scoring is not interrupted, so the second point may finish too: whatever finished is shown
    kept = page.get_by_text(re.compile(r"Stopped: the (\d) point\(s\) finished before the stop are below"))
    kept.wait_for(timeout=120_000)
    finished = int(re.search(r"the (\d) point", kept.inner_text()).group(1))
    assert finished in (1, 2)
    page.wait_for_function(f"() => document.querySelectorAll('#sweep-table .virtual-row').length == {finished}")
    rows = page.locator("#sweep-table .virtual-row")
    assert [r.inner_text().split()[:2] for r in rows.all()] == [["Magnitude", s] for s in ["0.3", "0.5"][:finished]]
    page.wait_for_function(f"() => document.querySelectorAll('#sweep-chart .scatterlayer .point').length == {finished}")
    wait_idle(page, "sweep-status")
    # another y-axis redraws the same stored points with it (the shapes model opens on accuracy)
    assert page.locator("#sweep-chart .gtitle").text_content().startswith("accuracy")
    page.locator("#sweep-y input").click()
    page.get_by_role("option", name="mean KL(full || pruned)").click()
    page.wait_for_function("() => document.querySelector('#sweep-chart .gtitle').textContent.startsWith('mean KL')",
                           timeout=60_000)
    assert page.locator("#sweep-chart .scatterlayer .point").count() == finished
    assert "Stopped" in page.locator("#sweep-status").inner_text()  # nothing was run again

    # a stopped rerun: its own points only (none, or the one whose scoring the stop met), never the old ones
    page.get_by_label("Sparsities").fill("0.7,0.8")
    page.get_by_role("button", name="Run sweep").click()
    page.locator(f"#sweep-status {TRACKER} .progress-level").wait_for(state="attached", timeout=60_000)
    when_running(page.url)
    page.locator("#sweep-stop").click()
    # the rerun's own outcome: the first stop's words ("the 1 point(s) finished") may still be on the page, so
    # its status and its table are waited for together (0.7 is this sweep's first point, never the first's)
    page.wait_for_function("""() => {
        const status = document.querySelector('#sweep-status').innerText;
        const rows = [...document.querySelectorAll('#sweep-table .virtual-row')].map(r => r.innerText.split(/\\s+/));
        return (status.includes('Stopped: no point had finished') && rows.length == 0) ||
               (status.includes('Stopped: the 1 point(s) finished') && rows.length == 1 && rows[0][1] == '0.7');
    }""", timeout=120_000)
    finished = 0 if "no point" in page.locator("#sweep-status").inner_text() else 1
    page.wait_for_function(f"() => document.querySelectorAll('#sweep-table .virtual-row').length == {finished}")
    assert [r.inner_text().split()[:2] for r in page.locator("#sweep-table .virtual-row").all()] == \
        [["Magnitude", "0.7"]][:finished]
    assert page.locator("#sweep-chart .js-plotly-plot").count() == finished
    wait_idle(page, "sweep-status")

    page.get_by_role("tab", name="Teach").click()
    choose(page, "teach-methods", ["Magnitude", "Wanda"])
    at_sparsity(page, "0.55")
    page.get_by_role("button", name="Compare", exact=True).click()
    page.locator(f"#teach-status {TRACKER}", has_text="(2 of 2)").wait_for(timeout=180_000)
    page.locator("#teach-stop").click()
    told = page.get_by_text(re.compile(r"Finished before the stop: (.*) \(their chart"))
    told.wait_for(timeout=120_000)
    finished = re.search(r"Finished before the stop: (.*) \(their chart", told.inner_text()).group(1).split(", ")
    assert finished[0] == "Magnitude @ 0.55" and finished[1:] in ([], ["Wanda @ 0.55"])
    page.wait_for_function(
        f"() => document.querySelectorAll('#teach-chart .scatterlayer .trace').length == {len(finished)}")
    legend = chart_traces(page, "teach-chart")
    assert all(any(label in t for t in legend) for label in finished), legend
    assert_calm(page)
