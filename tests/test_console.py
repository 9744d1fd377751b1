"""What a person sees in the terminal: our progress and our messages, not library noise they
cannot act on (deprecations of calls we make, optional-backend fallbacks, nested loading bars)."""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("torch_dtype", "requires torchvision", "Loading pipeline components", "share=True", "Traceback")


def user_env():
    """The environment of a user's shell: without the test suite's verbosity settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    return env


def test_training_console_has_no_library_noise(tiny_sd_path, concept_dir, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train_dreambooth_loldu.py"), "--pretrained_model_name_or_path", tiny_sd_path,
           "--instance_data_dir", concept_dir, "--instance_prompt", "a photo of sks heart", "--max_train_steps", "2",
           "--validation_steps", "1", "--num_validation_images", "1", "--num_inference_steps", "2", "--output_dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=user_env(), timeout=600)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-3000:]
    assert "wrote loldu_adapter.safetensors" in said
    assert not [n for n in NOISE if n in said], said[-3000:]


def test_app_says_where_it_runs_and_nothing_else(tiny_sd_path, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app", "app.py"), "--base", tiny_sd_path, "--adapters", str(tmp_path),
                             "--port", str(port)], env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 180  # start-up is bounded; no result depends on timing
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "loldu app: open" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    said = "".join(lines)
    assert f"loldu app: open http://127.0.0.1:{port}/" in said, said[-3000:]
    # loading the base once, with its bars, is the app's start-up: only validations must not nest them
    assert not [n for n in NOISE if n in said and n != "Loading pipeline components"], said[-3000:]


def test_input_errors_under_accelerate_launch_are_one_line(concept_dir, tmp_path):
    """accelerate's launcher prints a traceback of its own for a non-zero exit status unless it is
    launched with --quiet; the status still says it failed."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", os.path.join(ROOT, "train_dreambooth_loldu.py"), "--pretrained_model_name_or_path",
           str(tmp_path / "sd15"), "--instance_data_dir", concept_dir, "--instance_prompt", "a photo of sks heart"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=user_env(), timeout=300)
    said = (proc.stdout + proc.stderr).strip()
    assert said == f"error: --pretrained_model_name_or_path {tmp_path / 'sd15'}: no such folder", said[-3000:]
    assert proc.returncode != 0
    # run directly, the status says it failed too
    direct = subprocess.run([sys.executable] + cmd[cmd.index(os.path.join(ROOT, "train_dreambooth_loldu.py")):], capture_output=True,
                            text=True, env=user_env(), timeout=300)
    assert direct.returncode == 2 and direct.stderr.strip() == said
