"""The page tl-serve shows at ``/``, in a real headless Chromium (Debian's ``chromium``, which
``.ci/run`` installs), driven by Playwright: it loads the page from a running server, picks an
image of the demo set, and reads the class and probability the page drew."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serving import serving

from helpers import best_checkpoint
from transfer_learning.data.images import list_images

SCREENSHOTS = Path(os.environ.get("TL_SCREENSHOTS", Path(__file__).resolve().parent / "screenshots"))
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium_path() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("no chromium here: apt-get install chromium (CI installs it)")
    return found


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def percent(p: float) -> str:
    return f"{100 * p:.1f} %"


@pytest.mark.slow
def test_the_page_shows_the_servers_answer_and_the_gradcam_overlay(
    browser, trained_run, shapes_dir, tmp_path
):
    checkpoint = best_checkpoint(trained_run)
    image = list_images(shapes_dir).files[0]
    with serving(checkpoint, log=tmp_path / "serve.log") as server:
        status, _, expected = server.post_files([(image.name, image.read_bytes())], "?top_k=5")
        assert status == 200, expected
        record = expected["predictions"][0]
        page = browser.new_page(viewport={"width": 1000, "height": 720})
        offsite: list[str] = []
        page.on(
            "request",
            lambda r: offsite.append(r.url) if not r.url.startswith((server.url, "blob:", "data:")) else None,
        )
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_selector("#model:has-text('classes')")
        assert "5 classes" in page.inner_text("#model")
        page.set_input_files("#files", str(image))
        result = page.locator(f"article.result[data-file='{image.name}']")
        result.locator(".top-class:not(:empty)").wait_for()
        shown_class = result.locator(".top-class").inner_text()
        shown_prob = result.locator(".top-prob").inner_text()
        bars = result.locator(".bars li")
        assert shown_class == record["predicted"]
        assert shown_prob == percent(record["score"])
        assert bars.count() == len(record["top_k"]) == 5
        assert [bars.nth(i).get_attribute("data-class") for i in range(5)] == [
            e["class"] for e in record["top_k"]
        ]
        assert result.locator(".bars li .value").all_inner_texts() == [
            percent(e["prob"]) for e in record["top_k"]
        ]
        assert result.locator(".uncertain").is_visible() == record["uncertain"]
        drawn = result.locator(".bars li").evaluate_all(
            "nodes => nodes.map(n => n.querySelector('.fill').getBoundingClientRect().width"
            " / n.querySelector('.track').getBoundingClientRect().width)"
        )  # each bar is drawn as long as its probability, not just labelled with it
        assert drawn == pytest.approx([e["prob"] for e in record["top_k"]], abs=0.01)
        picture = result.locator("img")
        assert picture.get_attribute("src").startswith("blob:")

        page.check("#gradcam")  # fetches the heatmap for the image already shown
        page.wait_for_function(
            "() => document.querySelector('article.result img').src.startsWith('data:image/png;base64,')"
        )
        assert picture.get_attribute("alt") == f"Grad-CAM of {record['predicted']}"
        width = page.evaluate("() => document.querySelector('article.result img').naturalWidth")
        assert width > 0  # the PNG decoded
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "serve_page.png"), full_page=True)
        page.uncheck("#gradcam")
        assert picture.get_attribute("src").startswith("blob:")

        page.set_input_files("#files", str(tmp_path / "serve.log"))  # not an image: the page says why
        page.wait_for_selector("#error:not([hidden])")
        assert "serve.log" in page.inner_text("#error") and "image" in page.inner_text("#error")
        page.close()
    assert not errors, errors
    assert not offsite, f"the page fetched from elsewhere: {offsite}"
    assert (SCREENSHOTS / "serve_page.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_page_shows_label_sets_of_a_multilabel_checkpoint(
    browser, multilabel_run, multilabel_dir, tmp_path
):
    checkpoint = best_checkpoint(multilabel_run)
    image = list_images(multilabel_dir / "images").files[0]
    with serving(checkpoint, log=tmp_path / "serve.log") as server:
        status, _, expected = server.post_files([(image.name, image.read_bytes())])
        assert status == 200, expected
        record = expected["predictions"][0]
        thresholds = server.get("/info")["thresholds"]
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#model:has-text('multi-label')")
        page.set_input_files("#files", str(image))
        result = page.locator("article.result")
        result.locator(".bars li").first.wait_for()
        shown = result.locator(".top-class").inner_text()
        assert shown == (", ".join(record["predicted"]) or "(no label)")
        bars = result.locator(".bars li")
        assert bars.count() == len(record["probabilities"]) == len(thresholds)  # every class, with its mark
        chosen = result.locator(".bars li.chosen").evaluate_all("nodes => nodes.map(n => n.dataset.class)")
        assert sorted(chosen) == sorted(record["predicted"])
        assert result.locator(".bars .mark").count() == len(thresholds)
        for i in range(bars.count()):
            name = bars.nth(i).get_attribute("data-class")
            assert bars.nth(i).locator(".value").inner_text() == percent(record["probabilities"][name])
            fill, track = (bars.nth(i).locator(part).bounding_box() for part in (".fill", ".track"))
            assert fill["width"] / track["width"] == pytest.approx(record["probabilities"][name], abs=0.01)
        page.close()
