"""The web playground at /ui, end to end: headless Chromium against a real server with real models.

Each case drives the page the way a person would (a mouse stroke, a finger on a touch screen, a file
upload, a form, a streamed poem), checks what the page shows against the API's own answer for the
same input, and saves a full-page screenshot to ``build/screenshots/`` for a human to look at.

Needs Chromium (Debian: ``apt-get install -y chromium fonts-noto-cjk``) and the ``playwright`` Python
package (a dev extra); its own browser download is never used. Without either the browser cases
skip (through the ``browser`` fixture); the checks that need only HTTP run anyway.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from live_server import serve
from PIL import Image
from test_service import STEADY, _check_form

from serving.prosody import LEVEL_GROUPS, TONE_MODES
from training.datasets.images import load_image_split

try:
    from playwright import sync_api as playwright_sync
except ImportError:  # a dev extra: only the browser cases need it
    playwright_sync = None

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "build" / "screenshots"
CHROMIUM = os.environ.get("DLBOOK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
API_KEY = "playground-key-7f3a"


@pytest.fixture(scope="module")
def server(exported: dict[str, dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve("DlbookService", tmp_path_factory.mktemp("playground") / "server.log", **STEADY) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium; every case that uses it (directly or through ``page``) skips without one."""
    if playwright_sync is None:
        pytest.skip("playwright is not installed: pip install -c constraints.txt -e '.[dev]'")
    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install -y chromium), nor DLBOOK_CHROMIUM set")
    with playwright_sync.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class PageProblems:
    """Uncaught script errors and blocked loads (a CSP refusal, say); 4xx fetches are expected, not problems."""

    def __init__(self, page: Any) -> None:
        self.messages: list[str] = []
        page.on("pageerror", lambda err: self.messages.append(f"uncaught: {err}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.messages.append(message.text)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, has_touch=True)
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    problems = PageProblems(tab)
    yield tab
    context.close()
    assert problems.messages == []


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """Full page into the test's folder and into build/screenshots/ (git-ignored) for people to look at."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)
    return path


def open_playground(page: Any, base: str) -> None:
    page.goto(f"{base}/ui/")
    page.wait_for_selector("#status:has-text('loaded')")


def preview_pixels(page: Any) -> np.ndarray:
    """The 28×28 frame the page drew, read back from its canvas (grey: the red channel)."""
    flat = page.evaluate("""() => {
        const c = document.getElementById('frame-preview');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
    }""")
    return np.array(flat, dtype=np.uint8).reshape(28, 28, 4)[:, :, 0]


def shown_prediction(page: Any) -> dict[str, Any]:
    page.wait_for_selector("#image-result", state="visible")
    return {
        "label": page.inner_text("#image-label"),
        "label_zh": page.inner_text("#image-label-zh"),
        "bars": page.locator("#image-bars li").all_inner_texts(),
    }


def test_a_mouse_stroke_is_classified_with_bars_and_the_frame(page: Any, server: str, tmp_path: Path) -> None:
    open_playground(page, server)
    page.select_option("#image-model", "digits-mlp")
    box = page.locator("#draw").bounding_box()
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    # a "7": a bar across the top, then a diagonal down to the bottom left
    page.mouse.move(x + 0.3 * w, y + 0.25 * h)
    page.mouse.down()
    page.mouse.move(x + 0.7 * w, y + 0.25 * h, steps=8)
    page.mouse.move(x + 0.42 * w, y + 0.8 * h, steps=12)
    page.mouse.up()
    shown = shown_prediction(page)
    assert len(shown["bars"]) == 5 and shown["label"] in shown["bars"][0] and shown["label_zh"] in shown["bars"][0]
    assert re.fullmatch(r"\d+\.\d%", page.inner_text("#image-probability"))
    frame = preview_pixels(page)
    assert frame.max() >= 200 and 20 < (frame > 64).sum() < 400, "the frame should hold a thin light stroke on black"
    # The frame the page shows is the one the model saw: classifying it directly gives the page's answer.
    answer = httpx.post(f"{server}/classify_pixels", json={"images": [frame.tolist()], "model": "digits-mlp"},
                        timeout=30).json()["predictions"][0]
    assert answer["label"] == shown["label"] and answer["label_zh"] == shown["label_zh"]
    screenshot(page, tmp_path, "1-draw-stroke")


def test_a_finger_draws_too(page: Any, server: str) -> None:
    """Touch input through the browser's own touch pipeline (CDP), so touch-action and pointer events are real."""
    open_playground(page, server)
    box = page.locator("#draw").bounding_box()
    cdp = page.context.new_cdp_session(page)
    points = [(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * (0.2 + 0.06 * i)) for i in range(11)]
    for i, (px, py) in enumerate(points):
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove" if i else "touchStart",
                                              "touchPoints": [{"x": px, "y": py}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    shown_prediction(page)
    assert (preview_pixels(page) > 64).sum() > 10


def test_an_uploaded_fashion_mnist_png_is_classified(page: Any, server: str, tmp_path: Path) -> None:
    split = load_image_split("fashion-mnist", "test")
    image = split.images[0]
    png = tmp_path / "fashion-test-0.png"
    Image.fromarray(image).save(png)
    open_playground(page, server)
    page.select_option("#image-model", "fashion-lenet")
    page.set_input_files("#image-file", str(png))
    shown = shown_prediction(page)
    expected = httpx.post(f"{server}/classify", files=[("images", (png.name, png.read_bytes(), "image/png"))],
                          data={"model": "fashion-lenet", "top_k": "5"}, timeout=30).json()["predictions"][0]
    assert (shown["label"], shown["label_zh"]) == (expected["label"], expected["label_zh"])
    assert [bar.split("\n")[0].split(" · ")[0] for bar in shown["bars"]] == [t["label"] for t in expected["top_k"]]
    # A 28×28 data-set image goes through unchanged, so the preview is the test image itself.
    assert np.array_equal(preview_pixels(page), image)
    assert page.locator("#upload-thumb").is_visible()
    screenshot(page, tmp_path, "2-upload-fashion-png")


def test_the_house_form_with_its_defaults_gives_a_price(page: Any, server: str, tmp_path: Path) -> None:
    open_playground(page, server)
    page.click("#price-submit")
    page.wait_for_selector("#price-result", state="visible")
    shown = page.inner_text("#price-value")
    assert re.fullmatch(r"\$\d{1,3}(,\d{3})+", shown), shown
    defaults = {"OverallQual": 6, "GrLivArea": 1500, "YearBuilt": 1975, "TotalBsmtSF": 1000, "GarageCars": 2,
                "Neighborhood": "NAmes"}
    price = httpx.post(f"{server}/predict_price", json={"records": [defaults], "model": "house-price"},
                       timeout=30).json()["prices"][0]
    assert shown == f"${round(price):,}"
    screenshot(page, tmp_path, "3-house-price")


def _acrostic(exported: dict[str, dict], length: int) -> str:
    """Common characters the brief poem model can write (its vocabulary comes from 200 real poems)."""
    known = set(exported["poem_rnn"]["preprocessing"]["vocab"]["tokens"])
    usable = [ch for ch in "春山风月花水天人日云江秋夜明家清" if ch in known]
    assert len(usable) >= length, f"the brief model knows too few common characters: {usable}"
    return "".join(usable[:length])




def test_a_poem_streams_in_with_the_chosen_form_and_acrostic(page: Any, server: str, exported: dict[str, dict],
                                                             tmp_path: Path) -> None:
    acrostic = _acrostic(exported, 4)
    open_playground(page, server)
    page.select_option("#poem-chars", "7")
    page.select_option("#poem-lines", "4")
    page.fill("#poem-acrostic", acrostic)
    page.click("#poem-form summary")  # open "Sampling"
    page.fill("#poem-temperature", "1")
    page.fill("#poem-seed", "2024")
    # Every change of the character counter and the status, in order, as the page makes them.
    page.evaluate("""() => {
        window.seen = [];
        const watch = new MutationObserver((records) => {
            for (const r of records) window.seen.push([r.target.id, r.target.textContent]);
        });
        for (const id of ['poem-count', 'poem-status']) {
            watch.observe(document.getElementById(id), {childList: true, characterData: true, subtree: true});
        }
    }""")
    page.click("#poem-submit")
    page.wait_for_selector("#poem-status[data-state='done']")
    poem = "".join(page.locator("#poem-output .poem .line").all_inner_texts())
    _check_form(poem, 7, 4)
    assert "".join(poem[line * 8] for line in range(4)) == acrostic
    assert page.locator("#poem-output .poem .line").all_inner_texts() == [poem[i * 8:(i + 1) * 8] for i in range(4)]
    # streamed: the counter went up a character at a time while the status still said "Writing…"
    state, counts_while_writing = "", []
    for element, text in page.evaluate("window.seen"):
        if element == "poem-status":
            state = text
        elif state.startswith("Writing"):
            counts_while_writing.append(int(text))
    assert counts_while_writing == list(range(1, len(poem) + 1)), counts_while_writing
    assert state == "Done"
    # the page sent exactly the chosen parameters: the same seed through the plain API gives the same poem
    body = {"chars_per_clause": 7, "lines": 4, "acrostic": acrostic, "temperature": 1.0, "seed": 2024,
            "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1, "n": 1, "model": "tang-poem"}
    assert httpx.post(f"{server}/generate_poem", json=body, timeout=60).json()["poems"][0]["poem"] == poem
    screenshot(page, tmp_path, "4-poem-stream")


def test_rhyme_and_tones_are_chosen_and_each_line_shows_its_tone_marks(page: Any, server: str, tmp_path: Path
                                                                       ) -> None:
    """The rhyme and tones selects reach the API; under each line the page shows its marks (平 仄 中 ？)
    and under the poem its rhyme group, exactly as the answer's ``prosody`` gives them."""
    open_playground(page, server)
    groups = page.eval_on_selector_all("#poem-rhyme option", "els => els.map(e => e.value)")
    assert groups == ["off", "auto", *LEVEL_GROUPS]
    assert page.eval_on_selector_all("#poem-tones option", "els => els.map(e => e.value)") == list(TONE_MODES)
    page.select_option("#poem-rhyme", "auto")
    page.select_option("#poem-tones", "strict")
    page.select_option("#poem-lines", "8")
    page.click("#poem-form summary")
    page.fill("#poem-seed", "7")
    page.click("#poem-submit")
    page.wait_for_selector("#poem-status[data-state='done']")
    lines = page.locator("#poem-output .poem .line").all_inner_texts()
    body = {"rhyme": "auto", "tones": "strict", "lines": 8, "seed": 7, "model": "tang-poem"}
    answer = httpx.post(f"{server}/generate_poem", json=body, timeout=60).json()["poems"][0]
    assert "".join(lines) == answer["poem"]
    assert page.locator("#poem-output .poem .tones").all_inner_texts() == answer["prosody"]["tones"]
    assert page.locator("#poem-output .poem .off-pattern").count() == 0  # strict: every line fits
    assert page.inner_text("#poem-output .poem .rhyme") == f"韵 {answer['prosody']['rhyme_group']}"
    screenshot(page, tmp_path, "4b-poem-rhyme")


def test_api_refusals_are_shown_as_readable_messages(page: Any, server: str, exported: dict[str, dict],
                                                     tmp_path: Path) -> None:
    open_playground(page, server)
    page.select_option("#poem-chars", "7")
    page.fill("#poem-acrostic", _acrostic(exported, 5))  # five line-starts for a four-line poem
    page.click("#poem-submit")
    page.wait_for_selector("#poem-error", state="visible")
    message = page.inner_text("#poem-error")
    # the request model refuses it (issue 21): a 400 naming the field
    assert "acrostic: has 5 characters but the poem has 4 lines" in message and "HTTP 400" in message, message
    assert page.get_attribute("#poem-status", "data-state") == "error"
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is a text file, not a picture")
    page.set_input_files("#image-file", str(not_an_image))
    page.wait_for_selector("#image-error", state="visible")
    assert "not an image" in page.inner_text("#image-error") and "HTTP 400" in page.inner_text("#image-error")
    # a required field left blank is caught before any request, named as the form names it
    page.fill("input[name=GrLivArea]", "")
    page.click("#price-submit")
    page.wait_for_selector("#price-error", state="visible")
    assert page.inner_text("#price-error") == "Living area above ground (sq ft) is required"
    screenshot(page, tmp_path, "5-api-errors")


def test_a_keyed_single_task_service_asks_for_the_key_and_shows_its_panel(
        browser: Any, exported: dict[str, dict], tmp_path: Path) -> None:
    from serving.guard import is_open

    if not (is_open("/ui/") and is_open("/ui/app.js")):
        pytest.skip("serving/guard.py does not exempt /ui from the API key yet (OPEN_PATHS/OPEN_PAGES), "
                    "so a keyed service cannot serve the page")
    with serve("PriceService", tmp_path / "server.log", DLBOOK_API_KEY=API_KEY, **STEADY,
               DLBOOK_PRICE_MODELS="house-price") as base:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(f"{base}/ui/")
        page.wait_for_selector("#auth", state="visible")
        assert "API key" in page.inner_text("#status")
        page.fill("#api-key", "not-the-key")
        page.click("#auth-form button")
        page.wait_for_selector("#auth-message:has-text('That key was refused')")  # asked again, saying why
        screenshot(page, tmp_path, "6-api-key-prompt")
        page.fill("#api-key", API_KEY)
        page.click("#auth-form button")
        page.wait_for_selector("#houses", state="visible")
        assert page.locator("#images").is_hidden() and page.locator("#poems").is_hidden()
        assert page.evaluate("sessionStorage.getItem('dlbook-api-key')") == API_KEY
        page.click("#price-submit")
        page.wait_for_selector("#price-result", state="visible")
        assert page.inner_text("#price-value").startswith("$")
        screenshot(page, tmp_path, "7-keyed-price-service")
        context.close()


def test_the_page_and_its_assets_are_served_with_strict_headers(server: str) -> None:
    assert httpx.get(f"{server}/ui", timeout=10).status_code == 307  # to /ui/, where relative URLs resolve
    for path, kind in [("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")]:
        response = httpx.get(f"{server}{path}", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"] == f"{kind}; charset=utf-8"
        assert "default-src 'none'" in response.headers["content-security-policy"]
        again = httpx.get(f"{server}{path}", headers={"if-none-match": response.headers["etag"]}, timeout=10)
        assert again.status_code == 304
    assert httpx.get(f"{server}/ui/service.py", timeout=10).status_code == 404


def test_the_page_works_under_a_path_prefix(page: Any, server: str) -> None:
    """Behind a proxy that adds ``/lab/`` the page must still reach its APIs: only relative URLs work there."""
    outside: list[str] = []

    def proxy(route: Any) -> None:
        url = route.request.url
        if url.startswith(f"{server}/lab/"):
            route.fulfill(response=route.fetch(url=server + url[len(f"{server}/lab"):]))
        else:
            outside.append(url)
            route.abort()

    page.route("**/*", proxy)
    open_playground(page, f"{server}/lab")
    page.click("#price-submit")
    page.wait_for_selector("#price-result", state="visible")
    assert outside == []
