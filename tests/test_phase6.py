import argparse
import contextlib
import json
import os
import types

import numpy as np
import pytest
import torch

import phase5_latent as p5
import phase6_reflow as p6
from conftest import assert_clean_error, load_ckpt, run_script
from test_phase5 import TINY, write_flower_folder

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_clip):
    """A tiny trained phase-5 run: the teacher of every test here."""
    root = tmp_path_factory.mktemp("teacher")
    folder = write_flower_folder(str(root / "flowers"), per_class=4)
    p5.main(["--data", folder, "--clip-model", tiny_clip, "--out-dir", str(root / "run"), "--vae-steps", "2",
             "--steps", "3", *map(str, TINY)])
    return root / "run"


STUDENT = ["--batch-size", "4", "--device", "cpu", "--num-samples", "2", "--precision", "fp32"]


def test_the_default_command_makes_pairs_trains_the_student_and_samples_then_resumes(tmp_path, teacher):
    before = {p.name: p.read_bytes() for p in teacher.iterdir() if p.is_file()}
    out = tmp_path / "run"
    r = run_script("phase6_reflow.py", "--teacher", teacher, "--out-dir", out, "--pairs", 5, "--steps", 3,
                   "--prompt", "a photo of a rose", "--save-npz", tmp_path / "s.npz", *STUDENT)
    assert r.returncode == 0, r.stderr
    for name in ("samples.png", "steps.png", "attention.png", "progress.png", "ckpt.pt", "pairs.pt", "metrics.json"):
        assert (out / name).exists(), name
    pairs = torch.load(out / "pairs.pt", weights_only=True)
    assert sum(len(chunk["ids"]) for chunk in pairs["chunks"]) == p6.PAIR_CHUNK   # rounded up to a whole chunk
    assert pairs["recipe"]["cfg_scale"] == p6.CFG_SCALE and pairs["recipe"]["teacher_steps"] == p6.TEACHER_STEPS
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].shape == (2, 64, 64, 3) and npz["labels"].tolist() == [1, 1]
    ckpt = load_ckpt(out / "ckpt.pt")
    assert ckpt["phase"] == 6 and ckpt["config"]["teacher"] == str(teacher) and ckpt["step"] == 3
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    assert "1 Euler step, one network call each" in r.stdout
    # the teacher is read, never written
    assert {p.name: p.read_bytes() for p in teacher.iterdir() if p.is_file()} == before
    # --resume trains on with the pairs on disk (none made again)
    r = run_script("phase6_reflow.py", "--teacher", teacher, "--out-dir", out, "--pairs", 5, "--steps", 5,
                   "--resume", *STUDENT)
    assert r.returncode == 0, r.stderr
    assert "from step 3 to 5" in r.stdout and "pairs/s" not in r.stdout and load_ckpt(out / "ckpt.pt")["step"] == 5


def test_a_missing_teacher_another_phase_and_the_teachers_own_folder_are_one_line(tmp_path, teacher):
    r = run_script("phase6_reflow.py", "--teacher", tmp_path / "none", "--out-dir", tmp_path / "a", *STUDENT)
    assert_clean_error(r, "no trained phase-5 run", "python phase5_latent.py --out-dir")
    (tmp_path / "p4").mkdir()
    for name in ("ckpt.pt", "vae.pt"):
        torch.save({"phase": 4, "config": {}, "step": 5}, tmp_path / "p4" / name)
    r = run_script("phase6_reflow.py", "--teacher", tmp_path / "p4", "--out-dir", tmp_path / "b", *STUDENT)
    assert_clean_error(r, "phase 4, not phase 5", "python phase5_latent.py")
    stopped = tmp_path / "stopped"                                   # a teacher stopped before its last step
    stopped.mkdir()
    for name in ("ckpt.pt", "vae.pt"):
        (stopped / name).write_bytes((teacher / name).read_bytes())
    r = run_script("phase6_reflow.py", "--teacher", stopped, "--out-dir", tmp_path / "c", "--pairs", 1, "--steps", 1,
                   *STUDENT)
    assert r.returncode == 0 and "the teacher stopped at step 3" in r.stderr and "--resume" in r.stderr, r.stderr
    with pytest.raises(SystemExit, match="the teacher's folder"):
        p6.main(["--teacher", str(teacher), "--out-dir", str(teacher), *STUDENT])


class Captions:
    """What make_pairs needs of the trainer: 3 classes of 2 captions each, and the empty prompt."""
    count, first = torch.tensor([2, 2, 2]), torch.tensor([0, 2, 4])
    text, mask = torch.randn(7, 3, 16, generator=torch.Generator().manual_seed(0)), torch.ones(7, 3, dtype=torch.bool)
    captions = [str(i) for i in range(6)] + [""]

    def draw(self, labels, u):
        return p6.TextConditionalTrainer.draw(self, labels, u)


def tiny_dit():
    torch.manual_seed(0)  # the same weights every time
    return p6.TextConditionalDiT(p6.LATENT_SHAPE, 4, 1, 32, 2, 16).eval()


def test_a_stopped_pair_making_goes_on_with_the_pairs_it_has_and_makes_the_same_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(p6, "PAIR_CHUNK", 4)
    monkeypatch.setattr(p6, "TEACHER_STEPS", 2)
    args = argparse.Namespace(pairs=10, seed=3, cfg_scale=2.0)
    recipe = {"teacher": "t", "cfg_scale": 2.0}
    whole = p6.make_pairs(args, tiny_dit(), Captions(), str(tmp_path / "whole.pt"), recipe, True,
                          contextlib.nullcontext())
    assert whole.images.shape == (12, 4, 16, 16) and whole.labels.max() < 6           # 3 chunks of 4
    sample, calls = p6.sample_conditional, []

    def ctrl_c_in_the_second_chunk(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(*a)
    monkeypatch.setattr(p6, "sample_conditional", ctrl_c_in_the_second_chunk)
    path = str(tmp_path / "pairs.pt")
    with pytest.raises(KeyboardInterrupt):
        p6.make_pairs(args, tiny_dit(), Captions(), path, recipe, True, contextlib.nullcontext())
    assert len(torch.load(path, weights_only=True)["chunks"]) == 1                   # the finished chunk is kept
    again = p6.make_pairs(args, tiny_dit(), Captions(), path, recipe, True, contextlib.nullcontext())
    assert len(calls) == 4                                                            # two chunks made, not three
    for a, b in ((again.noise, whole.noise), (again.images, whole.images), (again.labels, whole.labels)):
        assert torch.equal(a, b)
    with pytest.raises(SystemExit, match="cfg_scale 2.0, not 3.0"):                  # other pairs: refused
        p6.make_pairs(args, tiny_dit(), Captions(), path, {**recipe, "cfg_scale": 3.0}, True,
                      contextlib.nullcontext())


def test_the_loss_at_t0_is_the_one_step_pictures_error_and_training_lands_the_student_on_the_teachers_pictures(
        monkeypatch):
    """Reflow's exact case: at t = 0 the model sees only the noise z, so the loss there is |z + v(z, 0) - x1|^2,
    the one-step picture's squared error against the teacher's picture of z. Trained on a few pairs, the student's
    one step lands on them."""
    teacher, captions, g = tiny_dit(), Captions(), torch.Generator().manual_seed(0)
    with torch.no_grad():  # a new DiT's velocity is 0 (adaLN-Zero): the teacher's weights are moved off it
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = torch.tensor([0, 2, 4, 1, 3, 5, 0, 2])
    z = torch.randn(8, *p6.LATENT_SHAPE, generator=g)
    x1, _ = p6.sample_conditional(teacher, ids, 1.0, 8, z, (captions.text, captions.mask))
    data = p6.PairData(z, x1, ids, captions.captions)

    def one_step_error(model):
        with torch.no_grad():
            picture = p6.sample_conditional(model, ids, 1.0, 1, z, (captions.text, captions.mask))[0]
            return (picture - x1).square().mean()
    student = tiny_dit()
    monkeypatch.setattr(p6, "ONE_STEP_SHARE", 1.0)
    trainer = types.SimpleNamespace(loss=lambda model, p, i: p6.TextConditionalTrainer.loss(captions, model, p, i))
    loss = trainer.loss(student, torch.stack([z, x1]), ids)
    assert loss.item() == pytest.approx(one_step_error(student).item(), rel=1e-4)
    monkeypatch.setattr(p6, "ONE_STEP_SHARE", 0.5)
    before = one_step_error(student)
    student.train()
    ema = tiny_dit().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    args = argparse.Namespace(steps=300, max_minutes=None, lr=3e-3, batch_size=8)
    p6.train(args, student, ema, opt, data, contextlib.nullcontext(), 0, lambda s: None, trainer)
    assert one_step_error(student) < before / 10


def test_interactive_answers_each_prompt_and_a_too_long_one_asks_again(tmp_path, teacher):
    out = tmp_path / "run"
    assert run_script("phase6_reflow.py", "--teacher", teacher, "--out-dir", out, "--pairs", 1, "--steps", 1,
                      *STUDENT).returncode == 0
    import subprocess
    import sys
    from conftest import OFFLINE_ENV, ROOT
    r = subprocess.run([sys.executable, os.path.join(ROOT, "phase6_reflow.py"), "--teacher", str(teacher),
                        "--out-dir", str(out), "--interactive", *STUDENT], input="a rose\n" + "word " * 80 + "\n"
                       "two roses\n\n", capture_output=True, text=True, cwd=ROOT, env={**os.environ, **OFFLINE_ENV},
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "prompt too long" in r.stderr and "Traceback" not in r.stderr
    assert (out / "prompts" / "001.png").exists() and (out / "prompts" / "003.png").exists()
    assert r.stdout.count(" s\n") == 2 and not (out / "prompts" / "002.png").exists()
