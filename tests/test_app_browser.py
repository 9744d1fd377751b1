"""End to end in a real browser: Debian's headless Chromium driven by Playwright."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/test.sh installs it)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_sd_path, tmp_path_factory):
    from test_cli import trained_adapter

    d = tmp_path_factory.mktemp("browser_adapters")
    trained_adapter(tiny_sd_path, d / "dog.safetensors", 1)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app", "app.py"), "--base", tiny_sd_path, "--adapters", str(d),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    import urllib.request

    deadline = time.monotonic() + 180  # start-up: waits for the server, bounded; no test result depends on timing
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the app did not start:\n" + proc.stdout.read()[-3000:])
            time.sleep(0.5)
    yield url, d
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(app_url[0])
        yield page
        browser.close()


def test_bad_upload_then_select_generate_and_see_images(page, app_url, tmp_path):
    os.makedirs(ARTIFACTS, exist_ok=True)
    # a corrupt upload: a visible error, and the app keeps serving
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00garbage" * 20)
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    page.wait_for_timeout(500)
    page.click("#load")
    page.locator("#adapter-status").get_by_text("truncated or corrupt").wait_for(timeout=60_000)
    page.get_by_role("button", name="Remove all").click()
    # select the folder's adapter
    page.locator("#folder input").click()
    page.get_by_role("option", name="dog.safetensors").first.click()
    page.keyboard.press("Escape")
    page.click("#load")
    page.locator("#adapter-status").get_by_text("loaded dog").wait_for(timeout=60_000)
    # generate: two images with the adapter, each beside the base model's
    page.fill("#prompt textarea", "a photo of sks heart")
    page.click("#generate")
    page.locator("#status").get_by_text("done").wait_for(timeout=120_000)
    thumbs = page.locator("#gallery img")
    assert thumbs.count() >= 4
    assert page.locator("#gallery").get_by_text("base model").count() >= 1  # the side-by-side captions
    page.screenshot(path=os.path.join(ARTIFACTS, "app_e2e.png"), full_page=True)
    assert os.path.getsize(os.path.join(ARTIFACTS, "app_e2e.png")) > 10_000
