"""The app batches concurrent sessions' requests, each with its own adapters, into shared
pipeline calls; each image equals the one its session makes alone."""
import os
import threading

import pytest
import torch
from test_app import PROMPT, adapter_dir, pixels, studio  # noqa: F401 — fixtures

from loldu_diffusion.app_batch import Batcher, Request, generate_batch


def close(a, b):
    return (pixels(a) - pixels(b)).abs().max() <= 1  # 8-bit images: equal up to a rounding step


def test_a_batch_of_sessions_equals_each_alone(studio, adapter_dir):  # noqa: F811
    a, b, c = studio.new_session(), studio.new_session(), studio.new_session()
    a.add(str(adapter_dir / "dog.safetensors"))
    b.add(str(adapter_dir / "style.safetensors"))
    b.add(str(adapter_dir / "dog.safetensors"))
    b.set_weights({"style": 1.5, "dog": -0.5})  # c: no adapter
    asks = [(a, dict(seed=5, compare=True)), (b, dict(seed=6, negative_prompt="blurry", num_images=2)), (c, dict(seed=7))]
    alone = [s.generate(PROMPT, steps=2, **kw) for s, kw in asks]
    requests = [Request(s, PROMPT, steps=2, **kw) for s, kw in asks]
    requests.append(Request(c, " ", steps=2))  # a bad request is its own error only
    generate_batch(studio, requests)
    assert isinstance(requests[-1].result, ValueError) and "enter a prompt" in str(requests[-1].result)
    for (s, _), want, r in zip(asks, alone, requests):
        assert [cap for _, cap in r.result] == [cap for _, cap in want]
        assert all(close(got, ref) for (got, _), (ref, _) in zip(r.result, want))
        assert s.history[: len(r.result)] == r.result
    # the blends differ: a's image is not b's
    assert not close(requests[0].result[0][0], requests[1].result[0][0])


def test_the_batcher_serves_concurrent_requests_together(studio, adapter_dir):  # noqa: F811
    a, b = studio.new_session(), studio.new_session()
    a.add(str(adapter_dir / "dog.safetensors"))
    want = {s: s.generate(PROMPT, steps=2, seed=3)[0][0] for s in (a, b)}
    batcher = Batcher(studio)
    got = {}
    with studio.lock:  # the base is busy: requests pile up, and the worker then takes them together
        def ask(s):
            try:
                got[s] = batcher.submit(Request(s, PROMPT, steps=2, seed=3))
            except Exception as e:  # noqa: BLE001 — reported below
                got[s] = e

        threads = [threading.Thread(target=ask, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        with batcher.cond:
            batcher.cond.wait_for(lambda: len(batcher.waiting) == 2)
    for t in threads:
        t.join()
    assert batcher.last_batch == 2, got
    assert all(close(got[s][0][0], want[s]) for s in (a, b))


def test_two_pages_generate_at_once_through_the_app(tiny_sd_path, adapter_dir, tmp_path):  # noqa: F811
    """The Gradio app: two sessions (one with the preloaded adapter, one with none) ask at once;
    the adapter-less page's image is the other page's side-by-side base image."""
    import socket

    import numpy as np
    from gradio_client import Client
    from PIL import Image

    from loldu_diffusion.app import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(base=tiny_sd_path, adapters_dir=str(adapter_dir), preload=[str(adapter_dir / "dog.safetensors")],
                  outputs=str(tmp_path), port=port, block=False)
    try:
        a, b = (Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(2))
        b.predict(api_name="/clear")  # page b: no adapter
        # prompt, negative, sampler, steps, guidance, seed, random seed, images, size, side by side, fuse
        jobs = [c.submit("a photo of sks heart", "", "default", 2, 4.0, 11, False, 1, 16, compare, False, api_name="/generate")
                for c, compare in ((a, True), (b, False))]
        (gallery_a, status_a), (gallery_b, status_b) = (j.result(timeout=300) for j in jobs)
        # the outputs folder is not served: its names are predictable and every user's images are there
        import urllib.error
        import urllib.request

        saved = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
        assert len(saved) == 3
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/file={tmp_path / saved[0]}", timeout=30)
    finally:
        demo.close()
    assert status_a.startswith("done: dog:1") and status_b.startswith("done: no adapter")
    captions = [g["caption"] for g in gallery_a]
    assert captions[0].endswith("dog:1") and captions[1].endswith("base model") and len(gallery_b) == 1
    read = lambda g: np.asarray(Image.open(g["image"]["path"] if isinstance(g["image"], dict) else g["image"]), dtype=int)  # noqa: E731
    assert np.abs(read(gallery_a[1]) - read(gallery_b[0])).max() <= 1
    assert np.abs(read(gallery_a[0]) - read(gallery_b[0])).max() > 10  # the adapter changes the image


def test_sdxl_requests_without_a_negative_prompt_draw_as_alone_in_a_batch(tiny_sdxl_path, tmp_path):
    """SDXL encodes no negative prompt as zeros (force_zeros_for_empty_prompt), not as the encoded "": a batch that gave
    every sample a negative prompt ("" for none) drew those requests unlike themselves alone."""
    from loldu_diffusion.app import Studio

    studio = Studio(tiny_sdxl_path, str(tmp_path))
    assert studio.pipe.config.force_zeros_for_empty_prompt
    a, b = studio.new_session(), studio.new_session()
    asks = [(a, dict(seed=5)), (b, dict(seed=6, negative_prompt="blurry"))]
    alone = [s.generate(PROMPT, steps=2, **kw) for s, kw in asks]
    requests = [Request(s, PROMPT, steps=2, **kw) for s, kw in asks]
    generate_batch(studio, requests)
    for want, r in zip(alone, requests):
        assert all(close(got, ref) for (got, _), (ref, _) in zip(r.result, want))


def test_a_tab_closed_while_its_request_waits_leaves_no_page_links(tiny_sd_path, tmp_path):
    from loldu_diffusion.app import Studio

    studio = Studio(tiny_sd_path, str(tmp_path / "adapters"), outputs_dir=str(tmp_path / "outputs"))
    a, b = studio.new_session(), studio.new_session()
    requests = [Request(a, PROMPT, steps=1, seed=1), Request(b, PROMPT, steps=1, seed=2)]
    a.close()  # the tab goes while its request waits for the batch
    generate_batch(studio, requests)
    links = set(studio._shown.values())
    assert requests[0].result and not any(link in links or os.path.exists(link) for link, _ in requests[0].result)
    assert all(link in links for link, _ in requests[1].result) and a.history == []
