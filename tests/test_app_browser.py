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
    trained_adapter(tiny_sd_path, d / "style.safetensors", 2, rank=2)
    outputs = tmp_path_factory.mktemp("browser_outputs")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app", "app.py"), "--base", tiny_sd_path, "--adapters", str(d),
                             "--preload", str(d / "dog.safetensors"), "--outputs", str(outputs), "--port", str(port),
                             "--train-args", "--num_validation_images 1 --num_inference_steps 2 --validation_steps 2 --judge_images 0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(url)
    page.locator("#generate").wait_for(timeout=60_000)
    return page


@pytest.fixture()
def page(browser, app_url):
    page = open_page(browser, app_url[0])
    yield page
    page.close()


def test_bad_upload_then_select_generate_and_see_images(page, app_url, tmp_path):
    os.makedirs(ARTIFACTS, exist_ok=True)
    # a first page: the preloaded adapter is there with its trigger prompt
    assert page.locator("#prompt textarea").input_value() == "a photo of sks heart"
    assert page.get_by_text("weight of dog").count() == 1
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


def select_folder_adapter(page, name):
    page.locator("#folder input").click()
    page.get_by_role("option", name=name).first.click()
    page.keyboard.press("Escape")
    page.click("#load")


def generate_once(page, expected_images):
    """One image, seed 0, no side-by-side; waits until the gallery holds `expected_images`."""
    page.locator("#num-images input[type=number]").fill("1")
    page.locator("#num-images input[type=number]").press("Enter")
    page.locator("#compare input").set_checked(False)
    page.click("#generate")
    from playwright.sync_api import expect

    expect(page.locator("#gallery img")).to_have_count(expected_images, timeout=120_000)
    page.locator("#status").get_by_text("done").wait_for(timeout=60_000)


def newest_pixels(page):
    import io

    import numpy as np
    from PIL import Image

    src = page.locator("#gallery img").first.get_attribute("src")
    data = page.request.get(src if src.startswith("http") else page.url.rstrip("/") + "/" + src.lstrip("/")).body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_two_tabs_never_share_adapters_or_images(browser, app_url):
    import numpy as np

    url = app_url[0]
    a = open_page(browser, url)
    b = open_page(browser, url)
    try:
        # tab A adds a second adapter; tab B still has only the preloaded one
        select_folder_adapter(a, "style.safetensors")
        a.locator("#adapter-status").get_by_text("loaded style").wait_for(timeout=60_000)
        assert a.get_by_text("weight of style").count() == 1
        assert b.get_by_text("weight of style").count() == 0 and b.get_by_text("weight of dog").count() == 1
        # B removes everything and generates: the base alone, whatever A holds
        b.get_by_role("button", name="Remove all").click()
        b.locator("#adapter-status").get_by_text("all adapters removed").wait_for(timeout=60_000)
        generate_once(b, 1)
        assert b.locator("#gallery").get_by_text("no adapter").count() >= 1
        base_image = newest_pixels(b)
        generate_once(a, 1)
        assert a.locator("#gallery").get_by_text("dog:1, style:1").count() >= 1
        assert a.locator("#gallery").get_by_text("no adapter").count() == 0  # A's history is A's own
        assert not np.array_equal(newest_pixels(a), base_image)
        generate_once(b, 2)  # after A's turn, B's image is the base's again, pixel for pixel
        assert np.array_equal(newest_pixels(b), base_image)
        assert b.locator("#gallery").get_by_text("style").count() == 0
        # a reload is a fresh session: the preloaded adapter once, nothing of A's, an empty history
        a.reload()
        a.locator("#generate").wait_for(timeout=60_000)
        assert a.get_by_text("weight of dog").count() == 1 and a.get_by_text("weight of style").count() == 0
        assert a.locator("#gallery img").count() == 0
        generate_once(a, 1)
        assert a.locator("#gallery").get_by_text("dog:1").count() == 1
        assert a.locator("#gallery").get_by_text("style").count() == 0
        a.screenshot(path=os.path.join(ARTIFACTS, "app_two_tabs.png"), full_page=True)
    finally:
        a.close()
        b.close()


def test_train_from_the_page_one_at_a_time_with_cancel(browser, app_url, concept_dir):
    photos = sorted(os.path.join(concept_dir, f) for f in os.listdir(concept_dir) if f.endswith(".png"))[:3]
    a = open_page(browser, app_url[0])
    b = open_page(browser, app_url[0])

    def start(page, noun, steps):
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-photos input[type=file]").set_input_files(photos)
        page.wait_for_timeout(500)
        page.locator("#train-noun textarea, #train-noun input").first.fill(noun)
        page.locator("#train-steps input").fill(str(steps))
        page.click("#train")

    try:
        start(a, "heart", 100_000)  # long enough to be running while B tries
        a.locator("#train-status").get_by_text("training sks-heart: step").wait_for(timeout=120_000)
        start(b, "dog", 4)
        b.locator("#train-status").get_by_text("busy: one training at a time").wait_for(timeout=60_000)
        b.click("#train-cancel")
        b.locator("#train-status").get_by_text("only that page can cancel it").wait_for(timeout=60_000)
        a.click("#train-cancel")
        a.locator("#train-status").get_by_text("cancelled sks-heart").wait_for(timeout=60_000)
        # a short run: progress, validation images, then the adapter is loaded and listed
        a.locator("#train-steps input").fill("4")
        a.click("#train")
        # the cancelled run's folder is gone (photos included), so its name is free again
        a.locator("#train-status").get_by_text("done: sks-heart trained").wait_for(timeout=300_000)
        assert a.locator("#train-status").get_by_text("loaded sks-heart").count() == 1
        assert a.locator("#train-gallery img").count() >= 3  # after, step 2, the grid, the loss
        a.screenshot(path=os.path.join(ARTIFACTS, "app_train.png"), full_page=True)
        a.get_by_role("tab", name="Generate").click()
        assert a.get_by_text("weight of sks-heart", exact=True).count() == 1
        a.locator("#folder input").click()
        assert a.get_by_role("option", name="sks-heart (trained here)").count() == 1
    finally:
        a.close()
        b.close()
