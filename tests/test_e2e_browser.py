"""Label Studio's real web UI in headless Chromium: a newcomer follows README.md from sign-up to masks on screen.

Every step a user takes goes through Label Studio 1.23.2's UI, in the README's order, none through its API:

1. sign up on ``/user/signup/`` (a Label Studio of this test's own, started like ``make label-studio``: see
   :func:`newcomer_label_studio_environment`), then *Account & Settings* -> *Personal Access Token* ->
   *Create New Token*, read from the dialog;
2. the backend starts with the README's settings, ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (that
   token), at ``http://127.0.0.1:<port>`` (see below); it loads while the browser goes on with step 3;
3. *Create Project*: the name, *Data Import* -> *Upload Files* (two photos through the file chooser),
   *Labeling Setup* -> *Custom template* -> the README's labeling config pasted (clipboard, Ctrl+V) into the
   code editor, *Save*;
4. *Settings* -> *Model* -> *Connect Model*: a title and the backend's URL, *Validate and Save*, the card
   says *Connected*; then, as the README's interactive section says, the card's menu -> *Edit* -> *Interactive
   preannotations* on -> *Validate and Save*; *Annotation* -> *Prelabeling* is on, with the model selected;
5. the Data Manager: a click on the first task opens it in the editor; the backend predicts on opening, and
   the test asserts the predicted brush masks are listed in the region panel and painted (hiding the regions
   takes pixels off the canvases);
6. *Auto-Annotation* on (bottom bar), the key-point label chip, the Auto-Detect fly-out's smart key-point
   tool, a click on the photo: the bottom bar shows ``1 suggestions`` (the backend's mask for the click).

The config is the README's own: the ```` ```xml ```` block of its interactive section (the one with a smart
tool), read from README.md, so a README config that Label Studio refuses, or that the backend cannot serve,
fails here. The backend differs from ``make serve`` in two ways, both for speed and isolation only: a tiny
random-weight open_clip model (``tests/tiny.py``; this test checks the plumbing, not mask quality, so which
labels the masks get is not asserted) with a small input side, and a free loopback port instead of 9090
(the README's ``PORT=...`` variant: a fixed port would collide with a developer's own ``make serve``).

Waits are explicit (a selector, a URL, a value, a canvas condition), never sleeps; timeouts are generous for
a loaded 2-core machine. The browser reaches nothing but this machine (Label Studio's pages call out to
telemetry services; those requests are aborted). Chromium is the system's (``scripts/install-browser.sh``, run by ``make test``);
missing Chromium or Playwright fails, never skips. On failure a screenshot is saved in the test's tmp dir
(``failure.png``) and the backend's and Label Studio's log tails are printed with the failure. Takes 3.5 to 5 minutes
on a shared 2-core machine under load (Label Studio's first start, with its migrations, is the largest part).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.labelstudio import REPO_ROOT, LabelStudioServer, started
from tests.photos import COCO128_PHOTOS
from tests.served import Backend, start_backend
from tests.tiny import TINY_VIT

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
OUTSIDE = re.compile(r"^(?!https?://127\.0\.0\.1[:/])")  # any address but this machine's
README = REPO_ROOT / "README.md"
PHOTOS = [COCO128_PHOTOS / "000000000009.jpg", COCO128_PHOTOS / "000000000025.jpg"]
EMAIL, PASSWORD = "newcomer@example.com", "a-newcomer's-password-1"
PROJECT, MODEL_TITLE = "README path", "MaskCLIP"
REGIONS = ".lsf-tree__node_type_brushregion"  # the region panel's entries for brush masks
WAIT_MS = 60_000  # any one UI step on a loaded machine
PREDICT_MS = 180_000  # the first prediction: image download, the labels' text, the image tower
# Pixels with some opacity on the page's canvases, sampled every 16th pixel (the photo's canvas may be one).
PAINTED = """() => {
  let n = 0;
  for (const c of document.querySelectorAll('canvas')) {
    if (!c.width || !c.height) continue;
    let data;
    try { data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; } catch (e) { continue; }
    for (let i = 3; i < data.length; i += 4 * 16) if (data[i] > 0) n++;
  }
  return n;
}"""


def newcomer_label_studio_environment(suite: Mapping[str, str]) -> dict[str, str]:
    """The settings this test's Label Studio runs with, from the suite's (``tests/labelstudio.py``).

    Kept: what ``make label-studio`` sets (the same-machine address settings, so that *Connect Model* accepts
    ``http://127.0.0.1:<port>``) and what isolates a test server (its own data dir and ``HOME``, SQLite, no
    version check or telemetry). Dropped: the pre-made admin user and its legacy token, sign-up closed without
    an invitation link, local-file serving. So, as on a stock Label Studio, sign-up is open, the first user
    creates the organisation, and API access is by Personal Access Token (legacy tokens off).
    The suite's shared Label Studio (the ``label_studio`` fixture) keeps sign-up closed and is not used here.
    """
    dropped = {
        "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN",
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT",
    }  # fmt: skip
    return {key: value for key, value in suite.items() if key not in dropped}


class NewcomerLabelStudio(LabelStudioServer):
    """A Label Studio started with :func:`newcomer_label_studio_environment`, empty until someone signs up."""

    def environment(self) -> dict[str, str]:
        return newcomer_label_studio_environment(super().environment())


def readme_interactive_config() -> str:
    """The README's labeling config with a smart tool (its interactive section): the one this test pastes."""
    blocks = re.findall(r"```xml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    smart = [block for block in blocks if 'smart="true"' in block and "BrushLabels" in block]
    assert smart, "README.md has no ```xml labeling config with a smart tool and BrushLabels (its interactive section)"
    return smart[0].strip()


def _browser(playwright, user_data: Path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/install-browser.sh` (make test does)")
    return playwright.chromium.launch_persistent_context(
        str(user_data), executable_path=str(CHROMIUM), args=ARGS, headless=True,
        viewport={"width": 1400, "height": 900},
    )  # fmt: skip


def sign_up_and_create_token(page, url: str) -> str:
    """README step 2: sign up, then a Personal Access Token from *Account & Settings*; returns the token."""
    from playwright.sync_api import expect

    page.goto(url + "/user/signup/")
    page.locator("input[name=email]").fill(EMAIL)
    page.locator("input[name=password]").fill(PASSWORD)
    page.get_by_role("button", name="Create Account").click()
    page.get_by_title(EMAIL).click()  # the avatar, top right (its title is the user's e-mail)
    page.get_by_role("link", name="Account & Settings").click()
    page.get_by_role("link", name="Personal Access Token").click()
    page.get_by_role("button", name="Create New Token").click()
    token_box = page.get_by_role("textbox", name="Access Token")
    expect(token_box).to_have_value(re.compile(r"\S"))
    token = token_box.input_value()
    page.get_by_role("button", name="Close modal").click()
    return token


def create_project(page, url: str, config: str) -> int:
    """README step 4: *Create Project* with a name, the photos uploaded, the config pasted; returns its id."""
    from playwright.sync_api import expect

    page.goto(url + "/")
    page.get_by_role("button", name="Create Project").first.click()
    name = page.get_by_label("Project Name")
    # the dialog works on a draft project it creates first: acting before it exists breaks the dialog
    # ("Can't find key `pk`"); its default name in the field says it is there
    expect(name).to_have_value(re.compile(r"^New Project"))
    name.fill(PROJECT)
    page.get_by_text("Data Import", exact=True).click()
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Upload file").click()
    chooser.value.set_files([str(path) for path in PHOTOS])
    page.get_by_text(f"{len(PHOTOS)} files uploaded").wait_for()
    page.get_by_text("Labeling Setup", exact=True).click()
    page.get_by_role("button", name="Create custom template").click()
    page.evaluate("text => navigator.clipboard.writeText(text)", config)
    first_label = re.search(r'<Label value="([^"]+)"', config)
    assert first_label, "the README's config has no <Label value=...>"
    for attempt in range(3):  # once, a loaded run's preview stayed empty after a paste: a new paste renders it
        page.locator(".CodeMirror").click()  # the code editor (CodeMirror 5: no role or label of its own)
        page.keyboard.press("ControlOrMeta+A")
        page.keyboard.press("ControlOrMeta+V")
        # the editor holds the config as pasted (nothing auto-closed or re-indented), and the preview renders it
        page.wait_for_function(
            "config => document.querySelector('.CodeMirror').CodeMirror.getValue() === config", arg=config
        )
        label = page.get_by_text(first_label.group(1), exact=True).first
        try:
            label.wait_for(timeout=WAIT_MS // 3 if attempt < 2 else WAIT_MS)
            break
        except Exception:  # noqa: BLE001 - Playwright's TimeoutError: paste again (the last try raises)
            if attempt == 2:
                raise
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(re.compile(r"/projects/\d+/data"))
    project_id = int(re.search(r"/projects/(\d+)/", page.url).group(1))
    page.get_by_text(re.compile(rf"Tasks:\s*{len(PHOTOS)}\s*/\s*{len(PHOTOS)}")).wait_for()
    return project_id


def connect_model(page, backend_url: str) -> None:
    """README step 5 and its interactive section: *Connect Model*, then *Edit* -> *Interactive preannotations*."""
    from playwright.sync_api import expect

    page.get_by_role("link", name="Settings").click()
    page.get_by_role("link", name="Model").click()
    page.get_by_role("button").filter(has_text="Connect Model").click()
    page.locator("input[name=title]").fill(MODEL_TITLE)
    page.locator("input[name=url]").fill(backend_url)
    page.get_by_role("button", name="Save machine learning form").click()  # "Validate and Save"
    page.get_by_text("Connected", exact=True).wait_for()
    page.get_by_text(backend_url).wait_for()

    # The edit form fills its fields from the saved model after it opens, which can reset a box ticked too
    # early (a CI run saved is_interactive=false): tick once the form shows the saved URL, and read what the
    # save sent back; a form that still reset it is opened and ticked again.
    for _ in range(3):
        page.get_by_role("button", name="Machine learning model options").click()
        page.get_by_text("Edit", exact=True).click()
        expect(page.locator("input[name=url]")).to_have_value(backend_url)
        interactive = page.get_by_role("checkbox", name=re.compile(r"^Interactive preannotations"))
        interactive.check()
        expect(interactive).to_be_checked()
        with page.expect_response(lambda r: re.search(r"/api/ml/\d+$", r.url) and r.request.method == "PATCH") as saved:
            page.get_by_role("button", name="Save machine learning form").click()
        expect(page.get_by_text("Edit Model")).to_be_hidden()
        if saved.value.ok and saved.value.json().get("is_interactive"):
            return
    raise AssertionError(f"Interactive preannotations did not stay on: {saved.value.status} {saved.value.text()[:300]}")


def check_prelabeling(page) -> None:
    """README step 6: *Settings* -> *Annotation* -> *Prelabeling* is on with the model's *Models* entry (Label
    Studio 1.23.2 sets both when the model is connected; the README asks the user to check)."""
    from playwright.sync_api import expect

    page.get_by_role("link", name="Annotation", exact=True).click()
    expect(page.get_by_role("checkbox", name=re.compile(r"^Use predictions to prelabel tasks"))).to_be_checked()
    expect(page.get_by_role("button", name=f"{MODEL_TITLE} (Connected)")).to_be_visible()


def painted_pixels_when_settled(page) -> int:
    """The canvases' coloured pixel count once two polls 250 ms apart agree (the masks finished drawing)."""
    handle = page.wait_for_function(
        f"""() => {{
          const n = ({PAINTED})();
          const settled = n > 0 && n === window.__paintedBefore;
          window.__paintedBefore = n;
          return settled ? n : null;
        }}""",
        polling=250,
    )
    return int(handle.json_value())


def assert_masks_drawn(page) -> None:
    """The predicted masks are listed in the region panel and painted: hiding them takes pixels off."""
    page.locator(REGIONS).first.wait_for(timeout=PREDICT_MS)
    assert page.locator(REGIONS).count() >= 1
    painted = painted_pixels_when_settled(page)
    page.get_by_role("button", name="Hide all regions").click()
    page.wait_for_function(f"painted => ({PAINTED})() < painted", arg=painted, polling=250)


def smart_click(page) -> None:
    """README's interactive section: Auto-Annotation on, a key-point label, the smart tool, a click."""
    from playwright.sync_api import expect

    page.get_by_role("checkbox", name="Auto-Annotation").check()  # in the bottom bar
    page.keyboard.press("Escape")  # nothing selected: a label chip then goes to the tool, not a region
    # the KeyPointLabels' chips come first (the config's first control); pick the label, then the tool
    page.locator(".lsf-labels").first.get_by_text("Car", exact=True).click()
    page.locator("button.lsf-tool_smart:not([aria-label])").click()  # the Auto-Detect fly-out (no name)
    # the fly-out's own key-point tool: the tool bar also has the plain one (first) and the active smart one
    page.locator(".lsf-toolbar__smart").get_by_role("button", name="key-point-tool").click()
    expect(page.locator("button.lsf-tool_smart.lsf-tool_active[aria-label=key-point-tool]").first).to_be_visible()
    suggestions = page.get_by_text(re.compile(r"\d+ suggestions"))  # "1 suggestions" in the bottom bar
    expect(suggestions).to_have_count(0)  # none before the click
    box = page.locator(".lsf-main-content canvas").first.bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5)
    suggestions.first.wait_for(timeout=PREDICT_MS)


def test_a_newcomer_following_the_readme_gets_masks_and_a_smart_suggestion(tmp_path, weights):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install -e '.[test]' (never `playwright install`)")
    config = readme_interactive_config()
    with contextlib.ExitStack() as stack:
        label_studio = stack.enter_context(started(tmp_path / "label-studio", NewcomerLabelStudio))
        pool = stack.enter_context(ThreadPoolExecutor(1))
        playwright = stack.enter_context(sync_playwright())
        browser = _browser(playwright, tmp_path / "chromium-profile")
        stack.callback(browser.close)
        browser.route(OUTSIDE, lambda route: route.abort())  # Label Studio's telemetry: nothing leaves the machine
        browser.grant_permissions(["clipboard-read", "clipboard-write"], origin=label_studio.url)
        browser.set_default_timeout(WAIT_MS)
        page = browser.new_page()
        backend: Future[Backend] | None = None
        try:
            token = sign_up_and_create_token(page, label_studio.url)
            # the backend loads its model while the project is created (the README's order, run side by side)
            backend = pool.submit(start_backend, tmp_path / "backend", TINY_VIT, str(weights), label_studio.url,
                                  workers=1, extra_env={"LABEL_STUDIO_API_KEY": token})  # fmt: skip
            stack.callback(_stop_backend, backend)
            project_id = create_project(page, label_studio.url, config)
            connect_model(page, backend.result().url)
            check_prelabeling(page)
            page.goto(f"{label_studio.url}/projects/{project_id}/data")
            page.get_by_role("img", name="Data").first.click()  # the first task's photo: opens it in the editor
            assert_masks_drawn(page)
            smart_click(page)
        except BaseException:  # what was on screen, and both logs (pytest shows them with the failure)
            with contextlib.suppress(Exception):  # a browser that died has no screenshot to give
                page.screenshot(path=str(tmp_path / "failure.png"))
            print(f"screenshot: {tmp_path / 'failure.png'}\nLabel Studio log:\n{label_studio.log_tail()}")
            if backend is not None and backend.done() and backend.exception() is None:
                print(f"backend log:\n{backend.result().log_text()[-3000:]}")
            raise


def _stop_backend(starting: Future[Backend]) -> None:
    try:
        backend = starting.result()
    except Exception:  # it did not start (start_backend stopped it): the test already fails with the reason
        return
    backend.stop()
