"""The live page of ``vlm-edge serve`` in a real headless browser (Debian's chromium, driven by
Playwright): it loads, both sources' frames advance, the class editor changes the label shown,
and with a token the page asks for it first. Skipped only where chromium or Playwright is absent
(and the class-editor test where torch is: it exports a bundle with a text engine).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from fakebundle import make_bundle, write_images
from liveserver import export_tiny, open_service, serving, settings_with, wait_for

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs Playwright (pip install playwright)"
)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("needs Debian's chromium (apt install chromium)", allow_module_level=True)

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "page-token"
#: the current picture of a source's live <img>, drawn on a canvas (same origin: readable)
SNAPSHOT = """(name) => {
  const img = document.querySelector(`[data-source="${name}"] img.live`);
  if (!img || !img.naturalWidth) return null;
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  canvas.getContext("2d").drawImage(img, 0, 0);
  return canvas.toDataURL("image/png");
}"""


def _serve(bundle: Path, root: Path):
    """A started Service with two looping sources on ``bundle``, served open and behind a
    token: yields (open URL, secured URL)."""
    write_images(root / "front", 3, seed=5)
    write_images(root / "yard", 3, seed=6)
    service = open_service(bundle, {"front": root / "front", "yard": root / "yard"}, root / "st")
    secured = settings_with(service, token=TOKEN)
    with service, serving(service) as base, serving(service, secured) as secure:
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, "sources live")
        yield base, secure


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two sources on the tiny fake bundle (no torch needed)."""
    root = tmp_path_factory.mktemp("serve_page")
    yield from _serve(make_bundle(root / "bundle", method="tca"), root)


@pytest.fixture(scope="module")
def served_text(tmp_path_factory):
    """Two sources on an exported tiny bundle with a text engine: its classes can change."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("serve_page_text")
    yield from _serve(export_tiny(root / "export", ["cat", "dog", "bird"]), root)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors


def _frames(page, name: str) -> int:
    return int(page.get_attribute(f'[data-source="{name}"]', "data-frames") or 0)


def test_page_shows_both_sources_live(served, page, tmp_path) -> None:
    url, _ = served
    page.goto(url)
    for name in ("front", "yard"):
        page.wait_for_selector(f'[data-source="{name}"] img.live')
    first = {name: _frames(page, name) for name in ("front", "yard")}
    pictures = {
        name: wait_for(lambda n=name: page.evaluate(SNAPSHOT, n), "a frame") for name in first
    }
    for name in first:  # the count from /v1/sources and the picture itself both move on
        wait_for(lambda n=name: _frames(page, n) > first[n], f"frames of {name}")
        wait_for(
            lambda n=name: page.evaluate(SNAPSHOT, n) != pictures[n], f"a new picture of {name}"
        )
        label = page.text_content(f'[data-source="{name}"] .decision .label')
        assert label in ("cat", "dog", "bird", "car", "bus", "train")
        assert page.locator(f'[data-source="{name}"] .timings tbody tr').count() >= 1
        assert page.locator(f'[data-source="{name}"] .bars li').count() == 6
    seq = int(page.get_attribute('[data-source="front"] img.live', "data-seq"))
    assert seq >= 1  # the picture on screen is a frame the service numbered
    page.check('[data-source="front"] input.fate')
    assert page.get_attribute('[data-source="front"] img.live', "data-fate") == "true"
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


def test_class_editor_changes_the_label_shown(served_text, page) -> None:
    url, _ = served_text
    page.goto(url)
    # polled from here: the page's CSP (no eval) refuses Playwright's string predicates
    wait_for(lambda: page.input_value("#classes"), "the classes in the editor")
    new = ["zebra", "yak", "owl"]
    page.fill("#classes", "\n".join(new))
    page.click("#apply")
    page.wait_for_selector("#classes-message.ok")
    for name in ("front", "yard"):
        wait_for(
            lambda n=name: page.text_content(f'[data-source="{n}"] .decision .label') in new,
            f"a new label on {name}",
        )
    assert httpx.get(f"{url}/v1/classes").json()["classes"] == new
    page.fill("#classes", "zebra\nzebra")  # refused by the service: the error is shown
    page.click("#apply")
    page.wait_for_selector("#classes-message.error")
    assert "twice" in page.text_content("#classes-message")
    assert httpx.get(f"{url}/v1/classes").json()["classes"] == new


def test_page_asks_for_the_token(served, page) -> None:
    _, secure = served
    page.goto(secure)
    page.wait_for_selector("#login:not([hidden])")
    assert page.locator("[data-source]").count() == 0
    page.fill("#token", "wrong")
    page.click("#login-form button")
    page.wait_for_selector("#login-message.error")
    page.fill("#token", TOKEN)
    page.click("#login-form button")
    page.wait_for_selector("#login", state="hidden")
    page.wait_for_selector('[data-source="yard"]')
    wait_for(lambda: page.evaluate(SNAPSHOT, "yard"), "a frame through the session cookie")
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = next(iter(cookies.values()))
    assert session["httpOnly"] and session["sameSite"] == "Strict"


def test_teach_a_frame_from_the_page_and_delete_it(served_text, page, tmp_path) -> None:
    """The card's Teach button freezes the frame on screen; a new label typed there becomes a
    class and an example with its thumbnail; its Delete button unlearns it."""
    url, _ = served_text
    page.goto(url)
    page.wait_for_selector('[data-source="front"] .teach-button')
    wait_for(lambda: page.evaluate(SNAPSHOT, "front"), "a frame")
    for round_ in range(5):
        page.click('[data-source="front"] .teach-button')
        page.wait_for_selector("#teach:not([hidden])")
        wait_for(lambda: page.get_attribute("#teach-frame", "data-seq"), "the frozen frame")
        seq = int(page.get_attribute("#teach-frame", "data-seq"))
        assert seq >= 1
        if round_ == 0:
            page.screenshot(path=str(tmp_path / "teach-dialog.png"))
        page.fill("#teach-label", "forklift")
        page.click("#teach-submit")
        page.wait_for_selector("#teach", state="hidden")
        wait_for(lambda r=round_: page.locator("#example-list li").count() == r + 1, "the example")
    listed = httpx.get(f"{url}/v1/examples").json()
    assert listed["counts"] == {"forklift": 5}
    assert all(e["source"] == "front" and e["thumbnail"] for e in listed["examples"])
    assert "forklift" in httpx.get(f"{url}/v1/classes").json()["classes"]
    wait_for(lambda: page.locator('#example-list img[src*="thumbnail"]').count() == 5, "thumbs")
    page.screenshot(path=str(tmp_path / "teach-page.png"), full_page=True)
    first = listed["examples"][0]["id"]
    page.click(f'#example-list li[data-id="{first}"] button.delete')
    wait_for(lambda: page.locator("#example-list li").count() == 4, "the deleted example gone")
    assert httpx.get(f"{url}/v1/examples").json()["counts"] == {"forklift": 4}


@pytest.fixture(scope="module")
def served_slow(tmp_path_factory):
    """One source decided every 2 s (a slow engine's pace)."""
    root = tmp_path_factory.mktemp("serve_page_slow")
    write_images(root / "cam", 2, seed=3)
    bundle = make_bundle(root / "bundle", method="tca")
    service = open_service(bundle, {"cam": root / "cam"}, root / "st", max_fps=0.5)
    with service, serving(service) as base:
        yield base


def test_a_slow_source_shows_its_rate_and_the_frame_decision(served_slow, page) -> None:
    """At 0.5 frames a second the card shows 0.5 fps as the API does (it showed 0.0), and the
    decision under the picture is that frame's."""
    url = served_slow
    page.goto(url)
    api_fps = wait_for(
        lambda: httpx.get(f"{url}/v1/sources").json()["sources"][0]["fps"] or None,
        "a rate from the API",
        tries=200,
    )
    assert 0.3 < api_fps < 0.7
    wait_for(lambda: page.text_content('[data-source="cam"] .fps') not in ("–", "0.0"), "fps")
    shown = float(page.text_content('[data-source="cam"] .fps'))
    assert abs(shown - api_fps) <= 0.1
    seq = wait_for(lambda: page.get_attribute('[data-source="cam"] img.live', "data-seq"), "seq")
    headers = httpx.get(f"{url}/v1/sources/cam/frame.jpg", params={"after": int(seq) - 1}).headers
    assert int(headers["x-frame-seq"]) >= int(seq)
    label = page.text_content('[data-source="cam"] .decision .label')
    assert label in ("cat", "dog", "bird", "car", "bus", "train")
