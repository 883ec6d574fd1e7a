"""End to end in a real Chromium: set a slider, launch, watch the chart and the sample table fill, stop, and see
the before/after panel. Run with ``pytest -m browser``; CI installs Debian's chromium."""

import json
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (Debian/Ubuntu: apt-get install chromium)"
    ),
]


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def test_launch_watch_stop_and_compare(tmp_path, free_port):
    sync_api = pytest.importorskip("playwright.sync_api")
    import app

    runs = tmp_path / "runs"
    port = free_port()
    demo = app.serve(port=port, runs_dir=str(runs), prevent_thread_lock=True, warm=False)
    m = app.default_method(app.available())
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(45_000)
            try:
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#launch")

                # a number box without bounds: what is typed is what is sent (a slider would clamp 999 to 5)
                _set_number(page, f"{m}-temperature", 0.7)
                assert page.locator(f"#{m}-temperature input[type=number]").input_value() == "0.7"
                # a long run (so that it is still going when Stop is pressed) of tiny steps
                _set_number(page, f"{m}-steps", 300)
                _set_number(page, f"{m}-batch_size", 2)
                if page.locator(f"#{m}-group_size").count():
                    _set_number(page, f"{m}-group_size", 2)
                page.click(f"#{m}-advanced")  # the accordion with the rest of the method's fields
                _set_number(page, f"{m}-eval_size", 4)  # held-out prompts scored at the start and the end

                page.click("#launch")
                page.wait_for_selector("#plot .js-plotly-plot .scatterlayer .trace")  # the chart got its first step
                # the sample table got rows: arith prompts such as "47+38="
                page.wait_for_function(
                    "document.querySelectorAll('#samples [role=row]').length > 1 && "
                    "document.querySelector('#samples').innerText.includes('=')"
                )
                assert "step" in page.locator("#progress-text, #lab-progress-text").first.inner_text()

                page.click("#stop")
                page.wait_for_function("document.querySelector('#stop-note').innerText.includes('Stopping')")
                page.wait_for_function("document.querySelector('#status').innerText.includes('stopped after')")
                # Stop again after the end: its reply goes beside the button, the final status keeps the record
                page.click("#stop")
                page.wait_for_function("document.querySelector('#stop-note').innerText.includes('No run')")
                assert "record" in page.locator("#status").inner_text()
                page.wait_for_function("document.querySelector('#before-after-summary').innerText.includes('before')")
                summary = page.locator("#before-after-summary").inner_text()
                assert "after" in summary and "difference" in summary
                assert page.locator("#before-after [role=row]").count() == 1 + 8  # header + 8 prompts
                page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)  # what the page showed
                print(f"page at failure: {tmp_path / 'failure.png'}")
                raise
            browser.close()
    finally:
        demo.close()

    assert (tmp_path / "app.png").stat().st_size > 10_000
    (run,) = [d for d in runs.iterdir() if d.is_dir()]
    status = json.loads((run / "status.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert status["status"] == "stopped" and 1 <= status["steps"] < 300
    # what was typed reached the trainer
    assert config["temperature"] == 0.7 and config["steps"] == 300 and config["eval_size"] == 4
