"""Checkpoints and the output folder: nothing a user had is lost, two runs never mix (review of session 19)."""
import os
import types

import pytest

from loldu_diffusion.training.checkpoints import (RUN_FILE, TRAINABLE_FILE, check_resume_subjects, existing_outputs,
                                                  resolve_resume, write_checkpoint)
from loldu_diffusion.training.errors import TrainingError
from loldu_diffusion.training.outdir import claim_output_dir, refuse_to_replace, remove_stale_temp


class FakeAccelerator:
    """What write_checkpoint and claim_output_dir use of accelerate's Accelerator, one process."""
    is_main_process, num_processes = True, 1

    def __init__(self, fail=False):
        self.fail, self.said = fail, []

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        os.makedirs(folder, exist_ok=True)
        if self.fail:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        (open(os.path.join(folder, TRAINABLE_FILE), "wb")).close()

    def print(self, line):
        self.said.append(line)


def checkpoint(folder, step):
    os.makedirs(os.path.join(folder, f"checkpoint-{step}"))
    open(os.path.join(folder, f"checkpoint-{step}", TRAINABLE_FILE), "wb").close()


def test_the_last_checkpoint_survives_a_failed_write_and_the_limit_holds_after_a_good_one(tmp_path):
    out = str(tmp_path)
    checkpoint(out, 5)
    with pytest.raises(OSError, match="could not write the checkpoint .*checkpoint-10.tmp.*disk full"):
        write_checkpoint(FakeAccelerator(fail=True), out, 10, 1, [], {}, None, [])
    assert os.path.isdir(tmp_path / "checkpoint-5")  # diffusers' order (prune, then write) had already deleted it
    for step in (10, 15):
        write_checkpoint(FakeAccelerator(), out, step, 2, [], {}, None, [])
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-") and not n.endswith(".tmp")) == ["checkpoint-10", "checkpoint-15"]


def test_every_method_s_output_and_an_earlier_run_s_checkpoints_are_existing_outputs(tmp_path):
    for name in ("learned_embeds.safetensors", "peft_adapter.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    os.makedirs(tmp_path / "dog")
    (tmp_path / "dog" / "learned_embeds.safetensors").write_bytes(b"x")
    checkpoint(str(tmp_path), 100)
    assert existing_outputs(str(tmp_path), subjects=["dog"]) == [
        "pytorch_lora_weights_kohya.safetensors", "learned_embeds.safetensors", "peft_adapter.safetensors",
        os.path.join("dog", "learned_embeds.safetensors"), "checkpoint-100"]


def test_a_killed_run_s_checkpoints_are_not_overwritten_by_a_fresh_run(tmp_path):
    out = str(tmp_path)
    checkpoint(out, 100)
    with pytest.raises(TrainingError, match=r"already holds checkpoint-100; pass --overwrite to replace it, "
                                            r"--resume_from_checkpoint latest to continue"):
        refuse_to_replace(out, existing_outputs(out), False, None, False)


def test_resuming_from_an_earlier_checkpoint_asks_before_the_later_ones_go(tmp_path):
    out = str(tmp_path)
    for step in (100, 200, 300):
        checkpoint(out, step)
    args = types.SimpleNamespace(resume_from_checkpoint="checkpoint-100", output_dir=out, overwrite=False, concepts=None)
    path = resolve_resume(args)
    assert path == os.path.join(out, "checkpoint-100")
    with pytest.raises(TrainingError, match="also holds the later checkpoint-200, checkpoint-300 of the run it went on to; pass --overwrite"):
        refuse_to_replace(out, existing_outputs(out), True, path, False)
    refuse_to_replace(out, existing_outputs(out), True, os.path.join(out, "checkpoint-300"), False)  # the last one: no question
    args.overwrite = True
    acc = FakeAccelerator()
    claim_output_dir(args, acc, path, existing_outputs).close()
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-100"]
    assert any("removed checkpoint-200, checkpoint-300 of the earlier run (--overwrite)" in line for line in acc.said)


def test_a_checkpoint_from_another_folder_does_not_let_a_run_replace_this_one_s_outputs(tmp_path):
    elsewhere, out = tmp_path / "a", tmp_path / "b"
    checkpoint(str(elsewhere), 500)
    os.makedirs(out)
    (out / "loldu_adapter.safetensors").write_bytes(b"a finished run")
    args = types.SimpleNamespace(resume_from_checkpoint=str(elsewhere / "checkpoint-500"), output_dir=str(out))
    path = resolve_resume(args)
    with pytest.raises(TrainingError, match=r"is not in --output_dir .*b, which already holds loldu_adapter.safetensors; pass --overwrite"):
        refuse_to_replace(str(out), existing_outputs(str(out)), True, path, False)
    refuse_to_replace(str(tmp_path / "empty"), existing_outputs(str(tmp_path / "empty")), True, path, False)  # an empty one: fine


def test_resume_reads_names_in_the_output_dir_first_and_refuses_a_renamed_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    checkpoint(str(out), 7)
    monkeypatch.chdir(tmp_path)
    checkpoint(str(tmp_path), 3)  # ./checkpoint-3 and ./out/checkpoint-3 would both do; diffusers reads the output_dir's
    checkpoint(str(out), 3)
    assert resolve_resume(types.SimpleNamespace(resume_from_checkpoint="checkpoint-3", output_dir=str(out))) == str(out / "checkpoint-3")
    os.rename(out / "checkpoint-7", out / "backup")
    with pytest.raises(TrainingError, match="--resume_from_checkpoint backup: a checkpoint folder is named checkpoint-STEP"):
        resolve_resume(types.SimpleNamespace(resume_from_checkpoint="backup", output_dir=str(out)))


def test_a_concepts_run_resumes_only_with_its_subjects_in_their_order(tmp_path):
    import json

    (tmp_path / RUN_FILE).write_text(json.dumps({"subjects": [["dog", "/data/dog"], ["cat", "/data/cat"]]}))
    check_resume_subjects(str(tmp_path), [["dog", "/data/dog"], ["cat", "/data/cat"]])
    with pytest.raises(TrainingError, match=r"trained the subjects dog \(dog\), cat \(cat\), in this order; resume with the --concepts_list"):
        check_resume_subjects(str(tmp_path), [["cat", "/data/cat"], ["dog", "/data/dog"]])
    (tmp_path / RUN_FILE).write_text(json.dumps({"seconds": 3.0}))  # a checkpoint from before subjects were recorded
    check_resume_subjects(str(tmp_path), [["cat", "/data/cat"]])


def test_temp_files_of_killed_writes_go_from_subject_folders_and_full_runs_too(tmp_path):
    os.makedirs(tmp_path / ".pipeline.tmpab12cd" / "unet")
    args = types.SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None, overwrite=False,
                                 concepts=[types.SimpleNamespace(name="dog")])
    os.makedirs(tmp_path / "dog")
    (tmp_path / "dog" / ".tmp-x1.safetensors").write_bytes(b"half")
    (tmp_path / "dog" / "README.md").write_text("kept")
    acc = FakeAccelerator()
    claim_output_dir(args, acc, None, lambda d: []).close()
    assert sorted(os.listdir(tmp_path / "dog")) == ["README.md"] and not (tmp_path / ".pipeline.tmpab12cd").exists()
    assert remove_stale_temp(str(tmp_path)) == []
