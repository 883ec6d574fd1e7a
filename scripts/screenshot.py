"""Take docs/screenshot.png from the real app: serve it, run a short GRPO run in Chromium, capture the page (the
live charts with reward against KL, the samples, before/after, the per-token view and the step inspector).

    python scripts/screenshot.py                       # docs/screenshot.png
    python scripts/screenshot.py --steps 30 --out /tmp/app.png

Needs Playwright (pip install playwright) and a Chromium at --chromium (Debian: apt-get install chromium).
The run is recorded in a temporary folder, so the repository's runs/ is left alone. It also prints how long the
first chart took to appear after the Launch click.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_number(page, elem_id: str, value) -> None:
    """Type into a Number or Slider widget (both hold an <input type=number>) and commit with Enter."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--method", default="grpo")
    parser.add_argument("--task", default="arith")
    parser.add_argument("--model", default="", help="empty: the task's built-in model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1600)
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    import app

    port = free_port()
    demo = app.serve(port=port, runs_dir=tempfile.mkdtemp(prefix="lab-runs-"), prevent_thread_lock=True)
    m = args.method
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#launch")
            if m != app.default_method(app.available()):
                page.locator("#method input").fill(m)
                page.locator("#method input").press("Enter")
            if args.model:
                page.locator("#model textarea, #model input").first.fill(args.model)
            set_number(page, f"{m}-steps", args.steps)
            set_number(page, f"{m}-temperature", 1.0)
            app.WARM_UP.join()  # as for a user who reads the page first: the model libraries are imported
            clicked = time.time()
            page.click("#launch")
            page.wait_for_selector("#charts svg polyline", timeout=120_000)
            print(f"first chart {time.time() - clicked:.1f} s after Launch")
            page.wait_for_function(
                "document.querySelector('#before-after-summary')?.innerText.includes('after')", timeout=600_000
            )
            print(f"run and before/after done {time.time() - clicked:.1f} s after Launch")
            page.click("#inspect")  # the step inspector on the last logged step, and one token's equation
            page.wait_for_selector("#inspector [data-tok]", timeout=60_000)
            page.locator("#inspector [data-tok]").nth(1).click()
            page.wait_for_function("document.querySelector('#equation')?.innerText.includes('ρ = exp')")
            page.click("#show-tokens")
            page.wait_for_function("document.querySelector('#tokens')?.innerText.trim().length > 0", timeout=60_000)
            page.wait_for_timeout(500)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
