"""Learning suite: does the subject get learnt, and at what cost to the rest of the model?

On the embedded base, for each subject (the bundled one and two the suite renders itself) and
each method (LoLDU with each init and several learning rates, LoRA, OLoRA, full fine-tuning),
DreamBooth runs with the real trainer, and every checkpoint is judged on
    subject   images of the instance prompt that show the subject (shape, colour, marking)
    prompt    recontextualised prompts ("… on a olive background"): subject and background right
    prior     class-prompt images ("a photo of a heart") that do NOT show the subject
              (the base model's rate is the ceiling; collapse onto the subject drives it down)
The judge plays the role DINO / CLIP-I / CLIP-T play in the DreamBooth benchmark.
"""
from __future__ import annotations

import os
import tempfile
import types

import torch

from ..toy import world
from ..toy.concepts import BENCH_SUBJECTS, TRAIN_BACKGROUNDS, render_subject
from ..training.args import EMBEDDED

RECONTEXT = [b for b in world.BACKGROUND_COLORS if b not in TRAIN_BACKGROUNDS] + ["white", "black"]


def configs(quick: bool):
    """LoLDU with every init at the embedded default learning rate, that rate ÷4 and ×4 for the
    default init, then the baselines at rates that learn on the embedded base."""
    from ..config import INITS

    lr = EMBEDDED["learning_rate"]
    if quick:
        return [dict(name="loldu-lu", method="loldu", init="lu", lr=lr), dict(name="lora", method="lora", lr=1e-3)]
    out = [dict(name=f"loldu-{i}", method="loldu", init=i, lr=lr) for i in INITS]
    out += [dict(name=f"loldu-lu-lr{x:g}", method="loldu", init="lu", lr=x) for x in (lr / 4, lr * 4)]
    out += [dict(name="lora", method="lora", lr=1e-3), dict(name="olora", method="olora", lr=1e-3),
            dict(name="full-adamw", method="full", lr=5e-5), dict(name="full-fira", method="full", lr=5e-5, optimizer="fira")]
    return out


@torch.no_grad()
def judge_model(pipe, judge, subject, n: int, seed: int = 1000) -> dict:
    from ..toy.evaluate_base import generate

    inst = judge.read(generate(pipe, [subject.instance_prompt] * n, seed))
    prompts = [subject.prompt_on(RECONTEXT[i % len(RECONTEXT)]) for i in range(n)]
    ctx = judge.read(generate(pipe, prompts, seed + 10_000))
    cls = judge.read(generate(pipe, [subject.class_prompt] * n, seed + 20_000))
    return {
        "subject": sum(subject.shown_in(a) for a in inst) / n,
        "prompt": sum(subject.shown_in(a) and a["background_color"] == p.split(" on a ")[1].split()[0] for a, p in zip(ctx, prompts)) / n,
        "prior": sum(not subject.shown_in(a) for a in cls) / n,
    }


def run_one(cfg, subject, instance_dir, work, steps, every, n_eval, judge):
    from safetensors.torch import load_file

    from ..training import parse_args, train
    from ..training.loop import TRAINABLE_FILE, load_models, make_pipeline
    from ..training.methods import make_method

    out = os.path.join(work, f"{cfg['name']}-{subject.identifier}")
    argv = ["--instance_data_dir", instance_dir, "--instance_prompt", subject.instance_prompt, "--class_prompt", subject.class_prompt,
            "--method", cfg["method"], "--learning_rate", str(cfg["lr"]), "--max_train_steps", str(steps),
            "--checkpointing_steps", str(every), "--output_dir", out, "--report_to", "none", "--num_validation_images", "1",
            "--validation_steps", str(10**9), "--overwrite"]
    argv += ["--init", cfg["init"]] if cfg.get("init") else []
    argv += ["--optimizer", cfg["optimizer"]] if cfg.get("optimizer") else []
    args = parse_args(argv)
    summary = train(args)
    method = make_method(args)

    def judged_checkpoint(step):
        m = load_models(args)
        models = types.SimpleNamespace(unet=m.unet, text_encoder=m.text_encoder, text_encoder_2=None)
        method.setup(models)
        method.load_trainable_state(models, load_file(os.path.join(out, f"checkpoint-{step}", TRAINABLE_FILE)))
        return judge_model(make_pipeline(m, m.unet, args), judge, subject, n_eval)

    def judged_output():
        m = load_models(args)
        pipe = make_pipeline(m, m.unet, args)
        method.load_output(pipe, out)
        return judge_model(pipe, judge, subject, n_eval)

    curve = [{"step": s, **judged_checkpoint(s)} for s in range(every, steps, every)]
    curve.append({"step": steps, **judged_output()})
    return {"config": cfg["name"], "subject": subject.identifier, "curve": curve,
            "seconds_per_step": summary["seconds_per_step"], "trainable": summary["trainable_parameters"],
            "output_bytes": summary["output_bytes"]}


def run(quick: bool = False, steps: int | None = None, out_dir: str = "bench_results", subjects: int | None = None) -> dict:
    from ..toy.evaluate_base import load_pipeline
    from ..toy.judge import load_judge

    steps = steps or (20 if quick else EMBEDDED["max_train_steps"])
    every = max(1, steps // (2 if quick else 3))
    n_eval = 4 if quick else 12
    subjects = BENCH_SUBJECTS[: subjects or (1 if quick else len(BENCH_SUBJECTS))]
    judge = load_judge()
    result = {"steps": steps, "every": every, "n_eval": n_eval, "runs": [], "base": {}}
    base = load_pipeline()
    with tempfile.TemporaryDirectory() as work:
        for subject in subjects:
            inst = os.path.join(work, f"subject-{subject.identifier}")
            render_subject(subject, inst)
            result["base"][subject.identifier] = judge_model(base, judge, subject, n_eval)
            for cfg in configs(quick):
                result["runs"].append(run_one(cfg, subject, inst, work, steps, every, n_eval, judge))
    result["summary"] = summarize(result)
    return result


def summarize(result: dict) -> dict:
    """Per config: final metrics averaged over subjects, and the first step reaching subject ≥ 0.5."""
    out = {}
    for run_ in result["runs"]:
        s = out.setdefault(run_["config"], {"subject": [], "prompt": [], "prior": [], "steps_to_half": [], "s_per_step": [], "trainable": run_["trainable"], "bytes": run_["output_bytes"]})
        final = run_["curve"][-1]
        for k in ("subject", "prompt", "prior"):
            s[k].append(final[k])
        s["steps_to_half"].append(next((c["step"] for c in run_["curve"] if c["subject"] >= 0.5), None))
        s["s_per_step"].append(run_["seconds_per_step"])
    for s in out.values():
        for k in ("subject", "prompt", "prior", "s_per_step"):
            s[k] = sum(s[k]) / len(s[k])
    return out


def markdown(r: dict) -> str:
    lines = [f"{r['steps']} steps, judged every {r['every']} on {r['n_eval']} images per prompt kind; subjects: "
             + ", ".join(r["base"]) + ".", "",
             "| config | subject ↑ | prompt ↑ | prior ↑ | first step with subject ≥ 0.5 | s/step | trainable | file bytes |",
             "|---|---|---|---|---|---|---|---|"]
    base = {k: sum(v[k] for v in r["base"].values()) / len(r["base"]) for k in ("subject", "prompt", "prior")}
    lines.append(f"| base model (no training) | {base['subject']:.2f} | {base['prompt']:.2f} | {base['prior']:.2f} | — | — | — | — |")
    for name, s in r["summary"].items():
        first = ", ".join(str(x) if x is not None else "—" for x in s["steps_to_half"])
        lines.append(f"| {name} | {s['subject']:.2f} | {s['prompt']:.2f} | {s['prior']:.2f} | {first} | {s['s_per_step']:.3f} | {s['trainable']:,} | {s['bytes']:,} |")
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
    names = list(r["summary"])
    for i, name in enumerate(names):
        runs = [x for x in r["runs"] if x["config"] == name]
        steps = [c["step"] for c in runs[0]["curve"]]
        for ax, k in zip(axes, ("subject", "prompt", "prior")):
            ys = [sum(x["curve"][j][k] for x in runs) / len(runs) for j in range(len(steps))]
            ax.plot([0] + steps, [sum(v[k] for v in r["base"].values()) / len(r["base"])] + ys, label=name,
                    color=f"C{i % 10}", linestyle="-" if name.startswith("loldu") else "--")
    for ax, k in zip(axes, ("subject fidelity", "prompt fidelity", "prior preservation")):
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
