"""End to end: the real server on a loopback port, the page in headless Debian Chromium driven by Playwright.

Playwright never downloads a browser here: it drives /usr/bin/chromium (Debian's package, installed by
scripts/install_chromium.sh from the Makefile's test set-up). Without it the test is skipped locally and fails
in CI (CI set), where the set-up must have installed it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from braintumor.serve import create_app
from braintumor.synthetic.phantom import make_phantom
from braintumor.visualize.explain import DEFAULT_LAYERS
from test_serve import flagging_classifier, marked_phantom_png

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT_COPY = Path("/tmp/braintumor_page.png")
SCREENSHOT_PHONE_COPY = Path("/tmp/braintumor_page_375.png")
NOT_MRI_CARD_SCREENSHOT = Path("/tmp/braintumor_not_mri_card.png")
CLASS_NAMES = ("glioma", "meningioma", "notumor", "pituitary")


def _require_browser():
    """Skip (locally) or fail (in CI) when Chromium or Playwright is missing; never download a browser."""
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (run scripts/install_chromium.sh)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright Python package is not installed"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """uvicorn serving the app in a background thread on a free 127.0.0.1 port, with this package's uvicorn
    settings; the model is tiny and its trust scores flag colour images as not MRI and grayscale slices with a
    bright corner as atypical (tests/test_serve.py flagging_classifier). Yields the base URL."""
    import uvicorn

    from braintumor.serve.app import uvicorn_options

    classifier = flagging_classifier(tiny_checkpoint)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    uv_server = uvicorn.Server(uvicorn.Config(create_app(classifier), log_level="warning", **uvicorn_options()))
    thread = threading.Thread(target=uv_server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv_server.should_exit = True
    thread.join(timeout=10)
    listener.close()


def phantom_png(path: Path, label: str, seed: int) -> Path:
    Image.fromarray(make_phantom(label, 96, seed)).save(path)
    return path


@pytest.mark.slow
def test_page_uploads_shows_probabilities_and_gradcam(server, tmp_path):
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    slice_path = phantom_png(tmp_path / "glioma_slice.png", "glioma", seed=5)
    dropped_path = phantom_png(tmp_path / "dropped.png", "meningioma", seed=6)
    answers = {}
    for path in (slice_path, dropped_path):
        response = httpx.post(f"{server}/api/predict",
                              files=[("files", (path.name, path.read_bytes(), "image/png"))], timeout=60)
        answers[path.name] = response.json()["results"][0]
        assert answers[path.name]["status"] == "ok"
    model = httpx.get(f"{server}/api/model").json()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            requested: list[str] = []
            failed_responses: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.on("response", lambda response: failed_responses.append(f"{response.status} {response.url}")
                    if response.status >= 400 and "/api/predict" not in response.url else None)
            page.goto(server)
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
            expect(page.get_by_test_id("research-note")).to_contain_text("Research use only")
            expect(page.get_by_test_id("model-arch")).to_have_text(model["arch"])
            expect(page.get_by_test_id("model-fingerprint")).to_have_text(model["fingerprint"])
            expect(page.get_by_test_id("model-classes")).to_have_text(", ".join(model["classes"]))
            expect(page.get_by_test_id("model-ood")).to_contain_text("on; probabilities calibrated")

            # Choose a file through the input.
            page.get_by_test_id("file-input").set_input_files(str(slice_path))
            card = page.locator(f'[data-testid="result"][data-filename="{slice_path.name}"]')
            expect(card).to_have_attribute("data-state", "done", timeout=30_000)
            check_card(card, answers[slice_path.name])
            expect(card.get_by_test_id("slice-image")).to_be_visible()
            assert card.get_by_test_id("slice-image").evaluate("img => img.naturalWidth") == 96

            # Drop a second file on the drop zone.
            data = base64.b64encode(dropped_path.read_bytes()).decode()
            transfer = page.evaluate_handle(
                """([name, data]) => {
                    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                    const transfer = new DataTransfer();
                    transfer.items.add(new File([bytes], name, { type: "image/png" }));
                    return transfer;
                }""", [dropped_path.name, data])
            page.get_by_test_id("drop-zone").dispatch_event("drop", {"dataTransfer": transfer})
            dropped = page.locator(f'[data-testid="result"][data-filename="{dropped_path.name}"]')
            expect(dropped).to_have_attribute("data-state", "done", timeout=30_000)
            check_card(dropped, answers[dropped_path.name])

            # An explanation beside the slice (not instead of it), with an opacity slider; off, then on again.
            toggle = card.get_by_test_id("gradcam-toggle")
            toggle.click()
            overlay = card.get_by_test_id("gradcam-image")
            expect(overlay).to_be_visible(timeout=30_000)
            expect(toggle).to_have_attribute("aria-pressed", "true")
            assert overlay.evaluate("img => img.complete && img.naturalWidth") > 0
            default = model["default_explain_method"]
            labels = model["explain_method_labels"]
            assert labels[default] in overlay.get_attribute("alt")
            expect(card.get_by_test_id("slice-image")).to_be_visible()
            slice_box = card.get_by_test_id("slice-image").bounding_box()
            overlay_box = overlay.bounding_box()
            assert overlay_box["x"] >= slice_box["x"] + slice_box["width"] - 1  # side by side
            expect(card.locator(".colour-bar")).to_be_visible()
            label = answers[slice_path.name]["predicted_class"]
            expect(card.get_by_test_id("gradcam-caption")).to_contain_text(
                f"{labels[default]} for {label}, averaged with the mirrored slice's map, read at "
                f"{DEFAULT_LAYERS[default]}")  # the default, said
            card.get_by_test_id("gradcam-opacity").fill("80")
            assert overlay.evaluate("img => getComputedStyle(img).opacity") == "0.8"
            toggle.click()
            expect(overlay).to_be_hidden()
            expect(card.get_by_test_id("slice-image")).to_be_visible()
            toggle.click()  # cached: shown again without another request
            expect(overlay).to_be_visible()
            assert sum("explain=1" in url for url in requested) == 1
            # Another method: fetched once, named in the caption.
            other = "gradcam" if default != "gradcam" else "gradcampp"
            card.get_by_test_id("explain-method").select_option(other)
            expect(card.get_by_test_id("gradcam-caption")).to_contain_text(f"{labels[other]} for {label}",
                                                                            timeout=30_000)
            assert sum(f"method={other}&" in url for url in requested) == 1
            # The mirror checkbox: off fetches the single-view map once, and the caption no longer says averaged.
            mirror_box = card.get_by_test_id("explain-mirror")
            expect(mirror_box).to_be_checked()
            mirror_box.uncheck()
            expect(card.get_by_test_id("gradcam-caption")).not_to_contain_text("averaged", timeout=30_000)
            expect(card.get_by_test_id("gradcam-caption")).to_contain_text(f"{labels[other]} for {label}")
            assert sum(f"method={other}&mirror=false" in url for url in requested) == 1
            mirror_box.check()  # cached: no new request
            expect(card.get_by_test_id("gradcam-caption")).to_contain_text("averaged with the mirrored slice's map")
            assert sum("explain=1" in url for url in requested) == 3

            # A photo is not a brain MRI slice: a plain card with no class and no class bars; the probabilities
            # only behind "show anyway", and even then no class is named as the answer.
            photo = tmp_path / "temple.jpg"
            from sklearn.datasets import load_sample_image

            Image.fromarray(load_sample_image("china.jpg")).save(photo, quality=90)
            page.get_by_test_id("file-input").set_input_files(str(photo))
            photo_card = page.locator('[data-testid="result"][data-filename="temple.jpg"]')
            expect(photo_card).to_have_attribute("data-state", "done", timeout=30_000)
            expect(photo_card).to_have_attribute("data-status", "not_mri")
            expect(photo_card.get_by_test_id("predicted-label")).to_have_text("Not recognised as a brain MRI slice")
            expect(photo_card.get_by_test_id("trust-banner")).to_contain_text("gives no class")
            expect(photo_card.get_by_test_id("probabilities")).to_be_hidden()
            expect(photo_card.locator(".bar-fill").first).to_be_hidden()
            visible_text = photo_card.inner_text()
            assert not any(name in visible_text for name in CLASS_NAMES), visible_text
            expect(photo_card.get_by_test_id("gradcam-toggle")).to_be_hidden()  # no explanation of a class it does not give
            photo_card.screenshot(path=str(NOT_MRI_CARD_SCREENSHOT))  # the plain card, as a user first sees it
            show = photo_card.get_by_test_id("show-probabilities")
            show.click()
            expect(photo_card.get_by_test_id("probabilities")).to_be_visible()
            expect(photo_card.get_by_test_id("probabilities-note")).to_be_visible()
            assert photo_card.get_by_test_id("probability").count() == len(model["classes"])
            assert photo_card.locator(".probability.top").count() == 0  # no class singled out
            expect(photo_card.get_by_test_id("predicted-label")).to_have_text("Not recognised as a brain MRI slice")
            expect(card).to_have_attribute("data-status", "ok")

            # An atypical slice keeps its class, with a calm warning.
            odd_path = tmp_path / "odd.png"
            odd_path.write_bytes(marked_phantom_png())
            page.get_by_test_id("file-input").set_input_files(str(odd_path))
            odd_card = page.locator('[data-testid="result"][data-filename="odd.png"]')
            expect(odd_card).to_have_attribute("data-status", "atypical", timeout=30_000)
            odd_answer = httpx.post(f"{server}/api/predict", files=[("files", ("odd.png", odd_path.read_bytes(),
                                                                               "image/png"))]).json()["results"][0]
            check_card(odd_card, odd_answer)
            expect(odd_card.get_by_test_id("trust-banner")).to_be_visible()
            expect(odd_card.get_by_test_id("trust-banner")).to_contain_text("unlike most of the training data")

            # A volume: the key slice's probability is labelled as that slice's; the volume's status is shown.
            from braintumor.synthetic.volumes import make_phantom_volume, write_nifti

            stack, _ = make_phantom_volume("glioma", 48, 6, seed=4)
            nifti = write_nifti(tmp_path / "case.nii.gz", stack)
            page.get_by_test_id("file-input").set_input_files(str(nifti))
            volume_card = page.locator('[data-testid="result"][data-filename="case.nii.gz"]')
            expect(volume_card).to_have_attribute("data-state", "done", timeout=60_000)
            volume_answer = httpx.post(f"{server}/api/predict", files=[("files", (nifti.name, nifti.read_bytes(),
                                                                                  "application/gzip"))],
                                       timeout=60).json()["results"][0]
            key = volume_answer["volume_prediction"]["key_slice"]
            expect(volume_card.locator(".prediction-label")).to_contain_text(f"Slice {key}")
            expect(volume_card.get_by_test_id("volume-status")).to_contain_text("Volume:")
            expect(volume_card.get_by_test_id("volume-status")).to_have_attribute(
                "data-status", volume_answer["volume_prediction"]["status"])
            expect(volume_card.get_by_test_id("volume-summary")).to_contain_text("that slice's own probabilities")
            if volume_answer["status"] in ("ok", "atypical"):
                expect(volume_card.get_by_test_id("predicted-confidence")).to_contain_text("for this slice")

            # An unreadable file gets its own card with the server's reason.
            bad = tmp_path / "notes.png"
            bad.write_text("not an image")
            page.get_by_test_id("file-input").set_input_files(str(bad))
            bad_card = page.locator('[data-testid="result"][data-filename="notes.png"]')
            expect(bad_card).to_have_attribute("data-state", "error", timeout=30_000)
            expect(bad_card.get_by_test_id("result-error")).to_contain_text("notes.png: not a readable image")
            expect(page.get_by_test_id("status")).to_contain_text("6 file(s): 5 analysed (1 not recognised, ")
            expect(page.get_by_test_id("status")).to_contain_text("1 unreadable.")

            # Results download as JSON and CSV (the results schema's fields and columns).
            with page.expect_download() as download:
                page.get_by_test_id("download-json").click()
            saved = json.loads(Path(download.value.path()).read_text())
            statuses = [r["status"] for r in saved["results"]]
            assert statuses[:4] == ["ok", "ok", "not_mri", "atypical"]
            assert saved["results"][2]["not_mri_score"] > 1 and "preview_png_base64" not in saved["results"][0]
            assert saved["results"][4]["volume_prediction"]["slices_total"] == 6
            with page.expect_download() as download:
                page.get_by_test_id("download-csv").click()
            rows = Path(download.value.path()).read_text().splitlines()
            assert rows[0].startswith("source,predicted_class,confidence,p_glioma") and len(rows) == 1 + 4 + 6
            assert rows[3].startswith("temple.jpg,") and ",not_mri," in rows[3]

            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            shutil.copyfile(shot, SCREENSHOT_COPY)

            page.set_viewport_size({"width": 375, "height": 800})
            assert page.evaluate("document.documentElement.scrollWidth") <= 375, "the page scrolls sideways"
            phone_shot = tmp_path / "page_375.png"
            page.screenshot(path=str(phone_shot), full_page=True)
            shutil.copyfile(phone_shot, SCREENSHOT_PHONE_COPY)

            # The API docs render from /openapi.json with local files only.
            page.goto(f"{server}/docs")
            expect(page.get_by_test_id("operation").first).to_be_visible()
            expect(page.get_by_test_id("endpoints")).to_contain_text("POST /api/predict")

            offsite = [url for url in requested if not url.startswith((server, "data:", "blob:"))]
            assert offsite == [], f"the page requested other hosts: {offsite}"
            assert failed_responses == [], f"requests that failed (a missing favicon?): {failed_responses}"
        finally:
            browser.close()
    assert Image.open(shot).size[0] == 1100 and Image.open(phone_shot).size[0] == 375


def check_card(card, answer: dict) -> None:
    """The card shows the API's class and each class's probability as a percentage with one decimal."""
    from playwright.sync_api import expect

    expect(card.get_by_test_id("predicted-label")).to_have_text(answer["predicted_class"])
    rows = card.get_by_test_id("probability")
    assert rows.count() == len(answer["probabilities"])
    for name, probability in answer["probabilities"].items():
        row = card.locator(f'[data-testid="probability"][data-class="{name}"]')
        expect(row.get_by_test_id("probability-value")).to_have_text(f"{100 * probability:.1f}%")
        assert float(row.get_attribute("data-probability")) == pytest.approx(probability, abs=1e-6)
    width = card.locator(f'[data-class="{answer["predicted_class"]}"] .bar-fill').evaluate("el => el.style.width")
    assert float(width.rstrip("%")) == pytest.approx(100 * answer["confidence"], abs=1e-3)
    assert np.isclose(sum(answer["probabilities"].values()), 1.0, atol=1e-5)
