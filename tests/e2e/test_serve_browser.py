"""The viewer in a real browser: headless Chromium (Debian's package, driven by Playwright)
opens ``/``, starts a session from the page, switches the prompt from the page, and the
canvas shows non-blank frames that change over time."""

from __future__ import annotations

import io
import os
import shutil

import pytest
from serve_helpers import start_server

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's package)"
)
SCREENSHOT_DIR_ENV = "FLASHDREAMS_SCREENSHOT_DIR"
"""Set to keep the canvas screenshots (for a person to look at)."""


def canvas_pixels(page, name: str, tmp_path):
    import numpy as np
    from PIL import Image

    png = page.locator("#canvas").screenshot()
    keep = os.environ.get(SCREENSHOT_DIR_ENV)
    for directory in filter(None, (str(tmp_path), keep)):
        with open(os.path.join(directory, f"{name}.png"), "wb") as handle:
            handle.write(png)
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(np.float32)


def stats_text(page) -> str:
    return page.locator("#stats").inner_text()


def test_viewer_starts_switches_and_plays_changing_frames(tmp_path):
    server = start_server(["wan-tiny-t2v"], tmp_path)
    try:
        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#prompt", "a red ball")
            page.click("#start")
            page.wait_for_function(
                "document.getElementById('stats').innerText.includes('state running')",
                timeout=120_000,
            )
            page.wait_for_function(
                "/shown (\\d+)/.exec(document.getElementById('stats').innerText)[1] >= 3",
                timeout=120_000,
            )
            first = canvas_pixels(page, "viewer-first", tmp_path)
            page.fill("#prompt", "a blue cube")
            page.click("#switch")
            page.wait_for_function(
                "document.getElementById('stats').innerText.includes('switched at chunk')",
                timeout=120_000,
            )
            shown = int(stats_text(page).split("shown ")[1].split()[0])
            page.wait_for_function(
                f"/shown (\\d+)/.exec(document.getElementById('stats').innerText)[1] >= {shown + 8}",
                timeout=120_000,
            )
            second = canvas_pixels(page, "viewer-after-switch", tmp_path)
            stats = stats_text(page)
            if os.environ.get(SCREENSHOT_DIR_ENV):
                page.screenshot(
                    path=os.path.join(os.environ[SCREENSHOT_DIR_ENV], "viewer-page.png")
                )
            page.click("#stop")
            page.wait_for_function(
                "document.getElementById('stats').innerText.includes('ended: stopped')",
                timeout=60_000,
            )
            assert page.locator("#log").inner_text() == ""
            browser.close()
    finally:
        assert server.stop() == 0, "".join(server.log)
    for pixels in (first, second):
        assert pixels.shape[0] >= 64 and pixels.std() > 5.0  # not blank
    assert abs(first - second).mean() > 2.0  # the frames change over time
    assert "prompt: a blue cube" in stats and "dropped by server 0" in stats
