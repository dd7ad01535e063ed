"""The web page at / in real headless Chromium (Playwright driving Debian's /usr/bin/chromium)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
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
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent; install Debian's chromium package"
    ),
]


@pytest.fixture(scope="module")
def page(gateway_server: str):  # yields a playwright Page
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(gateway_server)
        yield page
        browser.close()


def test_uploaded_images_get_probability_bars(page, exported_model, cifar_sample) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#model-info")).to_contain_text(f"version {exported_model.version}")
    paths = [str(path) for path, _ in cifar_sample[:2]]
    page.set_input_files("#file-input", paths)
    results = page.locator(".result")
    expect(results).to_have_count(2, timeout=20_000)
    for i, path in enumerate(paths):
        card = results.nth(i)
        expect(card.locator("h2")).to_contain_text(Path(path).name)
        rows = card.locator(".bar-row")
        expect(rows).to_have_count(len(exported_model.class_names))
        labels = rows.locator(".bar-label").all_inner_texts()
        assert sorted(labels) == sorted(exported_model.class_names)
        # Bars are drawn to scale and ordered from most to least likely.
        widths = [
            float(w.rstrip("%"))
            for w in rows.locator(".bar").evaluate_all("bs => bs.map(b => b.style.width)")
        ]
        assert widths == sorted(widths, reverse=True)
        assert sum(widths) == pytest.approx(100, abs=1.0)
        assert card.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
    expect(page.locator("#status")).to_contain_text(f"version {exported_model.version}")


def test_a_bad_file_shows_the_error_message(page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture\n" * 5)
    page.set_input_files("#file-input", str(not_an_image))
    expect(page.locator("#status")).to_contain_text("not_an_image", timeout=20_000)
    expect(page.locator("#status")).to_have_class("error")


def test_a_synthetic_demo_model_is_flagged(page) -> None:
    from playwright.sync_api import expect

    page.goto(page.url)  # the session model was trained on synthetic shapes
    expect(page.locator("#model-warning")).to_be_visible()
    expect(page.locator("#model-warning")).to_contain_text("synthetic shapes, not CIFAR-10 photos")


def test_a_model_trained_on_photos_carries_no_warning(page, exported_model, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    from tests.fixtures.exported import copy_model_base
    from tests.fixtures.gateway import embedded_gateway, serve_in_thread

    def trained_on_photos(card: dict) -> None:
        card["dataset"].update(name="cifar10", synthetic=False)

    base = copy_model_base(exported_model, tmp_path / "base", trained_on_photos)
    with embedded_gateway(base, exported_model.name) as app, serve_in_thread(app) as url:
        other = page.context.browser.new_page()  # one Playwright per process: reuse its browser
        try:
            other.goto(url)
            expect(other.locator("#model-info")).to_contain_text(f"version {exported_model.version}")
            expect(other.locator("#model-warning")).to_be_hidden()
        finally:
            other.close()


def test_a_gateway_with_api_keys_asks_for_one_and_then_classifies(
    page, gateway_app, exported_model, cifar_sample, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    from serving import auth
    from tests.fixtures.gateway import serve_in_thread
    from tests.serving.test_auth import keyed_app, keys_text

    key = auth.new_key()
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(keys_text(web=key))
    with serve_in_thread(keyed_app(gateway_app, keys_file)) as url:
        other = page.context.browser.new_page()
        try:
            other.goto(url)
            expect(other.locator("#key-form")).to_be_visible()
            expect(other.locator("#status")).to_contain_text("missing_api_key", timeout=20_000)
            other.fill("#api-key", key)
            other.click("#key-form button")
            expect(other.locator("#key-form")).to_be_hidden()
            expect(other.locator("#model-info")).to_contain_text(f"version {exported_model.version}")
            other.set_input_files("#file-input", str(cifar_sample[0][0]))
            expect(other.locator(".result")).to_have_count(1, timeout=20_000)
        finally:
            other.close()
