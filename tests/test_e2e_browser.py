"""Label Studio's real web UI in headless Chromium: the README's user path ends in masks on screen.

The session's Label Studio 1.23.2 (same-machine address settings) and the real backend (tiny random
model) are set up through the API: a project with the README's config plus a smart ``KeyPointLabels``,
a photo, the model connected at its loopback URL with *Interactive preannotations* on. Chromium (the
system's, ``scripts/install-browser.sh``) then logs in, opens the task, and the test asserts that the
predicted masks are drawn (listed in the region panel, coloured pixels on the canvas) and that a click of
the smart key-point tool (Auto-Annotation on, the Auto-Detect fly-out) brings a suggestion. A screenshot
is saved in the test's tmp dir when it fails. Missing Chromium or Playwright fails, never skips.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.photos import COCO128_PHOTOS
from tests.served import start_backend
from tests.tiny import TINY_VIT

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="Car"/><Label value="Road"/>
  </KeyPointLabels>
  <BrushLabels name="tag" toName="image">
    <Label value="Car" predicted_values="car,automobile,van"/>
    <Label value="Person"/>
    <Label value="Road"/>
  </BrushLabels>
</View>"""
REGIONS = ".lsf-tree__node_type_brushregion"


def _browser(playwright, user_data: Path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/install-browser.sh` (make test does)")
    return playwright.chromium.launch_persistent_context(
        str(user_data), executable_path=str(CHROMIUM), args=ARGS, headless=True,
        viewport={"width": 1400, "height": 900},
    )  # fmt: skip


def _coloured_canvas_pixels(page) -> int:
    """Pixels with some opacity on the page's canvases (sampled every 16th pixel); the photo's may be one."""
    return page.evaluate(
        """() => {
          let n = 0;
          for (const c of document.querySelectorAll('.lsf-main-content canvas, .lsf-image-view canvas, canvas')) {
            if (!c.width || !c.height) continue;
            let data;
            try { data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; } catch (e) { continue; }
            for (let i = 3; i < data.length; i += 4 * 16) if (data[i] > 0) n++;
          }
          return n;
        }"""
    )


def test_predicted_masks_are_drawn_and_a_smart_click_brings_a_suggestion(label_studio, tmp_path, weights):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install -e '.[test]' (never `playwright install`)")
    backend = start_backend(tmp_path / "backend", TINY_VIT, str(weights), label_studio.url, workers=1,
                            extra_env={"LABEL_STUDIO_API_KEY": label_studio.token})  # fmt: skip
    try:
        api = label_studio.api()
        pid = api.create_project("browser", CONFIG)["id"]
        api.import_files(pid, [COCO128_PHOTOS / "000000000009.jpg"])
        api.connect_ml_backend(pid, backend.url, title="MaskCLIP", is_interactive=True)
        task_id = api.list_tasks(pid, fields_all=False)[0]["id"]
        with sync_playwright() as playwright:
            browser = _browser(playwright, tmp_path / "chromium-profile")
            page = browser.new_page()
            try:
                page.goto(label_studio.url + "/user/login/")
                page.fill("input[name=email]", label_studio.username)
                page.fill("input[name=password]", label_studio.password)
                page.click("button[type=submit]")
                page.wait_for_load_state("networkidle")
                page.goto(f"{label_studio.url}/projects/{pid}/data?task={task_id}")
                # the backend predicts when the task opens (random model: which labels is not fixed)
                page.locator(REGIONS).first.wait_for(timeout=180_000)
                time.sleep(5)  # the editor mounts the annotation twice as it opens (tab=1)
                page.locator(REGIONS).first.wait_for(timeout=60_000)
                assert page.locator(REGIONS).count() >= 1
                painted = _coloured_canvas_pixels(page)

                page.locator("[data-testid=bottombar-auto-annotation-toggle]").click()
                page.locator("[aria-label='Hide all regions']").click()  # a click on a region selects it
                time.sleep(1)  # a frame to redraw
                # the masks are painted, not only listed: hiding the regions takes their pixels off the canvases
                assert painted > _coloured_canvas_pixels(page)
                page.keyboard.press("Escape")
                page.get_by_text("Car", exact=True).first.click()  # the KeyPointLabels chip, then the tool
                page.locator("button.lsf-tool_smart:not([aria-label])").click()  # the Auto-Detect fly-out
                page.locator("button.lsf-tool_smart[aria-label=key-point-tool]").first.click()
                box = page.locator(".lsf-main-content canvas, canvas").first.bounding_box()
                assert box is not None
                page.mouse.click(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5)
                page.get_by_text("suggestions").wait_for(timeout=120_000)  # "1 suggestions" in the bottom bar
            except BaseException:
                page.screenshot(path=str(tmp_path / "failure.png"))
                raise
            finally:
                browser.close()
    finally:
        backend.stop()
