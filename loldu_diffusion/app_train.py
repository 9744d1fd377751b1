"""Training from the app: the DreamBooth trainer's own `main` (same arguments, same defaults,
same output files) on photos dropped in the page, one training at a time.

The run is a child process rather than a thread of the app: Cancel ends it at once (its files
are written to temporary names and renamed, and its output-folder lock is a `flock` that dies
with it, so a cancelled run leaves nothing broken), and its copy of the base and its memory go
away with it instead of staying in the app that everyone shares. If the app itself dies, the
child's next progress line meets a closed pipe and it ends too.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .config import ADAPTER_FILE
from .io import atomic_write_text

MIN_PHOTOS, MAX_PHOTOS = 3, 10
MAX_CONTEXT = 200
# the trainer's progress bar, e.g. "loldu training:  45%|####5     | 270/600 [...]"
BAR = re.compile(r"training:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
LOG_LINES = 200


def caption(trigger: str, noun: str, context: str = "") -> str:
    """The photos' caption: 'sks', 'dog', 'on a grey sofa' → 'a photo of sks dog on a grey sofa'."""
    return " ".join(f"a photo of {trigger} {noun} {context}".split())


def run_name(trigger: str, noun: str) -> str:
    """'sks', 'dog' → 'sks-dog': a folder and adapter name from what the user typed."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{trigger}-{noun}".strip()).strip("-_")
    return name[:40] or "subject"


@dataclass
class Run:
    owner: object  # the session that started it: only it may cancel
    name: str
    output_dir: str
    total: int
    proc: subprocess.Popen
    step: int = 0
    state: str = "starting"  # starting, training, done, failed, cancelled
    lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    ended: threading.Event = field(default_factory=threading.Event)  # the process is gone and its output read

    @property
    def adapter(self) -> str:
        return os.path.join(self.output_dir, ADAPTER_FILE)

    def images(self) -> list[tuple[str, str]]:
        """(PNG, caption): the final images first when there are, then each validation step's,
        latest first, then the labelled grid and the loss plot."""
        try:
            names = set(os.listdir(self.output_dir))
        except OSError:  # not there yet, or a cancelled run's folder being deleted
            return []
        at = lambda n: os.path.join(self.output_dir, n)  # noqa: E731
        steps = sorted((int(m.group(1)), n) for n in names if (m := re.fullmatch(r"validation_step_(\d+)\.png", n)))
        out = [(at("validation_after.png"), "after")] if "validation_after.png" in names else []
        out += [(at(n), f"step {s}") for s, n in reversed(steps)]
        out += [(at(n), c) for n, c in (("validation_grid.png", "before · steps · after"), ("loss.png", "loss")) if n in names]
        return out

    def message(self) -> str:
        secs = time.monotonic() - self.started
        if self.state == "done":
            return f"**done:** {self.name} trained in {secs:.0f} s; listed in the folder choices"
        if self.state == "failed":
            errors = [ln for ln in self.lines if ln.startswith("error")] or self.lines[-1:] or ["the trainer stopped"]
            return f"**error:** {errors[-1]}"
        if self.state == "cancelled":
            return f"cancelled {self.name} at step {self.step}/{self.total}"
        phase = f"step {self.step}/{self.total}" if self.step else "loading the base and the before images"
        return f"training {self.name}: {phase} ({secs:.0f} s)"

    def warnings(self) -> list[str]:
        return [ln for ln in self.lines if ln.startswith("warning")]


class Trainer:
    """One training at a time for the whole app; runs live in `root`/NAME."""

    def __init__(self, base_path: str, root: str, extra_args=()):
        self.base_path = base_path
        self.root = root
        self.extra_args = list(extra_args)  # e.g. a short --max_train_steps for tests
        self.lock = threading.Lock()
        self.run: Run | None = None

    def busy(self) -> bool:
        return self.run is not None and self.run.state in ("starting", "training")

    def trained(self) -> list[str]:
        """The adapters finished runs wrote, for the app's list."""
        if not os.path.isdir(self.root):
            return []
        paths = (os.path.join(self.root, n, ADAPTER_FILE) for n in sorted(os.listdir(self.root)))
        return [p for p in paths if os.path.isfile(p)]

    def defaults(self):
        """The trainer's settings for this base (its defaults, with the app's extra arguments)."""
        import contextlib
        import io

        from .training import build_parser
        from .training.args import resolve_defaults

        argv = self.argv("photos", "sks", "subject", "unused")
        try:
            with contextlib.redirect_stderr(io.StringIO()) as said:  # argparse's usage block: one line instead
                args, unknown = build_parser().parse_known_args(argv)
        except SystemExit:
            raise ValueError(f"--train-args: {said.getvalue().strip().splitlines()[-1].split('error: ', 1)[-1]}") from None
        if unknown:
            raise ValueError(f"--train-args: the trainer takes no {' '.join(unknown)} (see train_dreambooth_loldu.py --help)")
        return resolve_defaults(args)

    def argv(self, photos_dir: str, trigger: str, noun: str, output_dir: str) -> list[str]:
        prompt = caption(trigger, noun)
        # the page shows before/after images: ask for them (a real base validates only when asked); the class
        # prompt lets the embedded base's recipe (pivotal tuning + prior preservation) apply, as in the trainer
        return ["--pretrained_model_name_or_path", self.base_path, "--instance_data_dir", photos_dir, "--instance_prompt", prompt,
                "--class_prompt", f"a photo of a {noun}", "--validation_prompt", prompt,
                "--output_dir", output_dir, "--report_to", "none", *self.extra_args]

    def start(self, owner, photos: list[str], trigger: str, noun: str, steps: int | None = None, context: str = "") -> Run:
        """Check everything the trainer would, copy the photos, and start the trainer; a one-line
        ValueError for what the user must fix, or when another training runs. `context` is what
        the photos share that is not the subject ("on a grey sofa"): it captions every photo, so
        the trigger word does not learn it (README, *Caption what is not the subject*)."""
        from .training import parse_args
        from .training.args import resolve_defaults
        from .training.args import check_inputs
        from .training.errors import TrainingError

        trigger, noun, context = (trigger or "").strip(), (noun or "").strip(), " ".join((context or "").split())
        if not trigger or not noun:
            raise ValueError("type a trigger word (a rare word such as sks) and what the subject is (dog, mug, heart)")
        if len(context) > MAX_CONTEXT:
            raise ValueError(f"the context is {len(context)} characters; say what the photos share in a few words (at most {MAX_CONTEXT})")
        if not MIN_PHOTOS <= len(photos) <= MAX_PHOTOS:
            raise ValueError(f"drop {MIN_PHOTOS} to {MAX_PHOTOS} photos of your subject ({len(photos)} given)")
        with self.lock:
            if self.busy():
                r = self.run
                raise ValueError(f"busy: one training at a time, and {r.name} is at step {r.step}/{r.total}; "
                                 "try again when it is done")
            name = self._free_name(run_name(trigger, noun))
            output_dir = os.path.join(self.root, name)
            photos_dir = os.path.join(output_dir, "photos")
            os.makedirs(photos_dir)
            for i, p in enumerate(photos):  # numbered: two photos may share a name
                copy = shutil.copy(p, os.path.join(photos_dir, f"{i:02d}_{os.path.basename(p)}"))
                if context:  # the trainer's per-image caption, NAME.txt
                    atomic_write_text(os.path.splitext(copy)[0] + ".txt", caption(trigger, noun, context) + "\n")
            argv = self.argv(photos_dir, trigger, noun, output_dir)
            if steps:
                argv += ["--max_train_steps", str(int(steps))]
            try:  # the trainer's own checks, before a process starts: one line in the page
                _check_photos(photos_dir)  # first: its message speaks of dropped photos, not of trainer flags
                args = resolve_defaults(parse_args(argv))
                check_inputs(args)
            except (ValueError, TrainingError) as e:
                shutil.rmtree(output_dir, ignore_errors=True)
                raise ValueError(str(e).splitlines()[0]) from None
            code = "import sys; from loldu_diffusion.training import main; sys.exit(main(sys.argv[1:]))"
            proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: Cancel ends it and its workers
            self.run = Run(owner, name, output_dir, args.max_train_steps, proc)
            threading.Thread(target=self._follow, args=(self.run,), daemon=True).start()
            return self.run

    def _free_name(self, name: str) -> str:
        k, candidate = 1, name
        while os.path.exists(os.path.join(self.root, candidate)):
            k += 1
            candidate = f"{name}-{k}"
        return candidate

    def _follow(self, run: Run) -> None:
        """Read the trainer's output: its progress bar (written with carriage returns) and lines."""
        buf = b""
        while chunk := run.proc.stdout.read1(4096):
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)
            for part in parts:
                self._take(run, part.decode("utf-8", "replace").strip())
        self._take(run, buf.decode("utf-8", "replace").strip())
        code = run.proc.wait()
        if run.state != "cancelled":
            run.state = "done" if code == 0 and os.path.isfile(run.adapter) else "failed"
        if run.state == "cancelled" or not os.path.isfile(run.adapter):  # nothing to keep, and the photos are someone's
            shutil.rmtree(run.output_dir, ignore_errors=True)  # (a run that failed after writing its adapter keeps it)
        run.ended.set()

    @staticmethod
    def _take(run: Run, line: str) -> None:
        if not line:
            return
        m = BAR.search(line)
        if m:
            run.step, run.total = int(m.group(1)), int(m.group(2))
            if run.state == "starting":  # never over "cancelled": the bar's last lines arrive after Cancel
                run.state = "training"
        elif not line.startswith(("Loading", "validation")):  # other bars: not news for the page
            run.lines = (run.lines + [line])[-LOG_LINES:]

    def cancel(self, owner) -> str:
        run = self.run
        if run is None or not self.busy():
            return "no training is running"
        if run.owner is not owner:
            return "this training was started in another page; only that page can cancel it"
        run.state = "cancelled"
        import signal

        try:
            os.killpg(run.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        run.ended.wait(60)  # the follower has read its last words (a killed process ends at once)
        return run.message()


POLL_SECONDS = 1.0


def _check_photos(folder: str) -> None:
    """The trainer's own reader on the dropped files: too few it can read is one line, naming them."""
    from .images import read_images

    found, skipped = read_images(folder)
    if len(found) < MIN_PHOTOS:
        names = ", ".join(s.split("_", 1)[1] for s in skipped)
        raise ValueError(f"{len(found)} of the files are photos the trainer can read (not: {names}); drop {MIN_PHOTOS} to "
                         f"{MAX_PHOTOS} photos of your subject")


def build_train_tab(studio, session, folder, adapter_outputs, slot_updates) -> None:
    """The Train tab: photos, trigger word, Train / Cancel, progress and validation images. When a
    run is done its adapter is loaded in this page and listed for every page."""
    import gradio as gr

    trainer = studio.trainer
    d = trainer.defaults()
    keep = [gr.update()] * len(adapter_outputs)  # adapters unchanged while a run goes on

    def train(session, files, trigger, noun, context, steps):
        paths = [getattr(f, "name", f) for f in (files or [])]
        try:
            run = trainer.start(session, paths, trigger, noun, int(steps or 0) or None, context)
        except (ValueError, OSError) as e:
            yield f"**error:** {(str(e).splitlines() or [type(e).__name__])[0]}", [], "", gr.update(), gr.update(), *keep
            return
        def shown():  # copies for the page: the run's folder itself is not served
            out = []
            for p, c in run.images():
                try:
                    out.append((studio.servable(p), c))
                except OSError:  # deleted meanwhile (a cancelled run)
                    pass
            return out

        while not run.ended.wait(POLL_SECONDS):  # wakes at once when the run ends or is cancelled
            yield run.message(), shown(), _warnings(run), gr.update(), gr.update(interactive=False), *keep
        loaded, said = keep, run.message()
        if run.state == "done" and run.owner is session:
            try:
                said_load = session.add_any(run.adapter, display_name=run.name)
                loaded = [said_load] + slot_updates(session)
                said += f" · in *Adapters*: {said_load}"
            except (ValueError, OSError) as e:  # e.g. the page already holds as many adapters as it can
                loaded = [f"**error:** {(str(e).splitlines() or [''])[0]}"] + keep[1:]
                said += f" · not loaded: {(str(e).splitlines() or [''])[0]}"
        yield (said, shown(), _warnings(run), gr.update(choices=studio.adapter_choices()), gr.update(interactive=True), *loaded)

    def cancel(session):
        return trainer.cancel(session)

    size = f"{d.resolution} px" if d.resolution else "its native size"
    gr.Markdown(
        f"Teach the base a subject from {MIN_PHOTOS}–{MAX_PHOTOS} photos, with the DreamBooth trainer's own defaults for this "
        f"base ({d.max_train_steps} steps, learning rate {d.learning_rate:g}, batch {d.train_batch_size}, rank {d.rank}, "
        f"{size}), as `accelerate launch train_dreambooth_loldu.py` would. One training at a time for everyone using this "
        f"app; its files (adapter, validation images, loss plot, model card) go to `{trainer.root}`.")
    with gr.Row():
        with gr.Column(scale=1):
            photos = gr.File(file_count="multiple", file_types=["image"], label=f"{MIN_PHOTOS}–{MAX_PHOTOS} photos of your subject",
                             elem_id="train-photos")
            with gr.Row():
                trigger = gr.Textbox(value="sks", label="Trigger word (a rare word)", elem_id="train-trigger")
                noun = gr.Textbox(value="", label="What it is (dog, mug, heart)", elem_id="train-noun")
                steps = gr.Number(value=0, precision=0, label=f"Steps (0: the trainer's {d.max_train_steps})",
                                  elem_id="train-steps")
            context = gr.Textbox(value="", label="What the photos share that is not the subject (optional: 'on a grey sofa')",
                                 elem_id="train-context")
            prompt_note = gr.Markdown("Instance prompt: `a photo of sks …`")
            with gr.Row():
                go = gr.Button("Train", variant="primary", elem_id="train")
                stop = gr.Button("Cancel", elem_id="train-cancel")
            status = gr.Markdown("", elem_id="train-status")
            warnings = gr.Markdown("", elem_id="train-warnings")
        with gr.Column(scale=1):
            images = gr.Gallery(label="Validation images (latest first), labelled grid, loss", columns=2, object_fit="contain",
                                elem_id="train-gallery")
    for box in (trigger, noun, context):
        box.change(lambda t, n, c: f"Instance prompt: `{caption(t.strip() or '…', n.strip() or '…', c)}`", [trigger, noun, context],
                   prompt_note)
    # no queueing behind a running training: a Train in another page answers at once that the trainer
    # is busy; this page's button is disabled while its run goes on, and no click after it is dropped
    go.click(train, [session, photos, trigger, noun, context, steps], [status, images, warnings, folder, go] + adapter_outputs,
             concurrency_limit=None, trigger_mode="multiple")
    stop.click(cancel, session, status, concurrency_limit=None)


def _warnings(run: Run) -> str:
    return "<br>".join(run.warnings())
