"""The app's batched generation: requests of different sessions, each with its own adapters,
in shared pipeline calls (per-sample blends, `serving.py`).

`Batcher` is dynamic batching: each request waits in a queue; one worker takes everything
waiting, generates it, and takes what arrived meanwhile. Requests with the same steps,
guidance, size and sampler share calls (at most MAX_SAMPLES images each); each image has its
own prompt, negative prompt, seed and blend, and a side-by-side base image is one more sample
with no adapter. Samples whose sessions use token embeddings (rows of the shared text-encoder
table) share a call only with samples using the same rows. An image equals the one its session would make alone (tests/test_app_batch.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .schedulers import DEFAULT as DEFAULT_SAMPLER
from .serving import generate

MAX_SAMPLES = 16  # images per pipeline call
MAX_REQUESTS = 16  # requests one batch serves


@dataclass
class Request:
    session: object  # app.Session
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 4.0
    seed: int = -1
    num_images: int = 1
    size: int | None = None
    compare: bool = False
    sampler: str = DEFAULT_SAMPLER
    progress: object = None  # progress(fraction, text), called from the worker thread
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    result: object = None  # [(image or PNG path, caption)], or the exception

    def key(self):
        return self.steps, self.guidance, self.size, self.sampler


def generate_batch(studio, requests: list[Request]) -> None:
    """Generate every request (each one's result set, errors included: a bad request never fails
    the others) and add the images to each session's history."""
    ready = []
    for r in requests:
        try:
            r.size, r.seed, _ = r.session.check(r.prompt, r.size, r.seed, r.sampler)
            r.steps, r.guidance, r.num_images = int(r.steps), float(r.guidance), int(r.num_images)
            ready.append(r)
        except Exception as e:  # noqa: BLE001 — reported to its own page
            r.result = e
    groups: dict[tuple, list[Request]] = {}
    for r in ready:
        groups.setdefault(r.key(), []).append(r)
    for group in groups.values():
        try:
            _run_group(studio, group)
        except Exception as e:  # noqa: BLE001 — the base is restored; every request of the group is told
            for r in group:
                r.result = e


def _run_group(studio, group: list[Request]) -> None:
    from .schedulers import make_scheduler

    steps, guidance, size, sampler = group[0].key()
    with studio.lock:
        studio._unfuse()  # per-sample blends need the unfused base
        samples = []  # (request, prompt, negative, seed, blend on the base, is the base image)
        used = {id(r): r.session.drawn() for r in group}  # read once: what it draws with is what captions and PNGs say
        for r in group:
            blend = used[id(r)].on_base
            for i in range(r.num_images):
                samples.append((r, r.prompt, r.negative_prompt, r.seed + i, blend, False))
                if r.compare and (blend or used[id(r)].rows):
                    samples.append((r, r.prompt, r.negative_prompt, r.seed + i, {}, True))
        # token embeddings are rows of the one shared table: samples share a call only if they use the same rows; and
        # where no negative prompt means zeros, not the encoded "" (SDXL's force_zeros_for_empty_prompt), samples with
        # and without one are apart too: a call's negative prompt is None or one per sample, as a request alone has it
        zeros = bool(getattr(studio.pipe.config, "force_zeros_for_empty_prompt", False))
        by_rows: dict[tuple, list[int]] = {}
        for j, (r, _, negative, *_, base) in enumerate(samples):
            by_rows.setdefault((() if base else used[id(r)].embedding_keys, zeros and not negative), []).append(j)
        calls = [(idx[k : k + MAX_SAMPLES], {} if not key[0] else used[id(samples[idx[0]][0])].rows)
                 for key, idx in by_rows.items() for k in range(0, len(idx), MAX_SAMPLES)]
        images, done = [None] * len(samples), [0]
        total = steps * len(calls)

        def on_step(pipe, i, t, kw):
            done[0] += 1
            for r in group:
                if r.progress is not None:
                    try:
                        r.progress(done[0] / total, f"step {done[0]}/{total} · {len(group)} request(s), {len(samples)} image(s) together")
                    except Exception:  # noqa: BLE001, S110 — a closed page's progress bar never stops the others
                        pass
            return kw

        studio.pipe.scheduler = make_scheduler(sampler, studio.base_scheduler)
        try:
            for idx, table in calls:
                chunk = [samples[j] for j in idx]
                studio.use_rows(table)
                drawn = generate(studio.pipe, [s[1] for s in chunk], [s[4] for s in chunk], [s[3] for s in chunk],
                                 negative_prompt=[s[2] or "" for s in chunk] if any(s[2] for s in chunk) else None, num_inference_steps=steps,
                                 guidance_scale=guidance, height=size, width=size, callback_on_step_end=on_step)
                for j, image in zip(idx, drawn):
                    images[j] = image
        finally:
            studio.use_rows({})
            studio.pipe.scheduler = studio.base_scheduler
    outs: dict[int, list] = {id(r): [] for r in group}
    for (r, prompt, negative, seed, _, base), image in zip(samples, images):
        settings = f"seed {seed} · {steps} steps · cfg {guidance:g} · {size}px · {sampler}"
        png = {"prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "guidance": guidance, "size": size,
               "sampler": sampler}
        d = None if base else used[id(r)]
        outs[id(r)].append(r.session.keep(image, seed, f"{settings} · {d.text if d else 'base model'}", d, png))
    for r in group:
        r.result, r.session.last_drawn = outs[id(r)], used[id(r)]
        r.session.remember(r.result)


class Batcher:
    """Requests from any thread; one worker generates whatever is waiting, together."""

    def __init__(self, studio, max_requests: int = MAX_REQUESTS):
        self.studio, self.max_requests = studio, max_requests
        self.waiting: list[Request] = []
        self.cond = threading.Condition()
        self.last_batch = 0  # how many requests the last call served together (shown in the page)
        threading.Thread(target=self._work, daemon=True, name="loldu-batcher").start()

    def submit(self, request: Request) -> list:
        """Wait for this request's images; raises its error."""
        with self.cond:
            self.waiting.append(request)
            self.cond.notify_all()
        request.done.wait()
        if isinstance(request.result, BaseException):
            raise request.result
        return request.result

    def _work(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.waiting)
            with self.studio.lock:  # while the base is busy (a batch, a fused generation, a load), requests pile up
                with self.cond:
                    batch, self.waiting = self.waiting[: self.max_requests], self.waiting[self.max_requests :]
                self._serve(batch)

    def _serve(self, batch: list[Request]) -> None:
        try:
            self.last_batch = len(batch)
            generate_batch(self.studio, batch)
        except BaseException as e:  # noqa: BLE001 — never leave a page waiting
            for r in batch:
                r.result = r.result if r.result is not None else e
        finally:
            for r in batch:
                r.done.set()
