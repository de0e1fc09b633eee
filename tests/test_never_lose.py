"""Never lose a trained model (third round): two runs in one folder, what a resume remembers, what an interrupt
skips, and the one-line errors that replaced tracebacks."""
import argparse
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluate
import phase1_flow as p1
import phase3_cfg as p3
import phase4_clip as p4
import phase5_latent as p5
from conftest import OFFLINE_ENV, ROOT, assert_clean_error, load_ckpt

FAST = ["--batch-size", "8", "--num-samples", "4", "--sample-steps", "2", "--width", "16", "--device", "cpu"]


def start(out, mnist_root, *extra):
    """phase 1 in the background, returned once it trains (its first progress line)."""
    run = subprocess.Popen([sys.executable, os.path.join(ROOT, "phase1_flow.py"), "--data-root", mnist_root,
                            "--out-dir", str(out), *FAST, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, **OFFLINE_ENV})
    for line in run.stdout:
        if line.startswith("step 25/"):
            return run
    raise AssertionError(run.stderr.read())


def test_one_run_per_out_dir_and_a_dead_runs_lock_does_not_block(tmp_path, mnist_root):
    first = start(tmp_path, mnist_root, "--steps", "100000")
    with pytest.raises(SystemExit, match="another run is using"):    # a second run, here in this process
        p1.main(["--data-root", mnist_root, "--out-dir", str(tmp_path), *FAST, "--steps", "2"])
    assert first.poll() is None and not (tmp_path / "ckpt.pt").exists()   # the first one trains on, untouched
    first.send_signal(signal.SIGKILL)                                  # dies without a word: its lock goes with it
    first.communicate(timeout=60)
    p1.main(["--data-root", mnist_root, "--out-dir", str(tmp_path), *FAST, "--steps", "2"])
    assert load_ckpt(tmp_path / "ckpt.pt")["step"] == 2


def test_a_resume_trains_on_with_the_runs_batch_size_and_learning_rate(tmp_path, mnist_root, capsys):
    common_args = ["--data-root", mnist_root, "--num-samples", "4", "--sample-steps", "2", "--width", "16",
                   "--device", "cpu"]
    run = ["--batch-size", "8", "--lr", "0.002"]
    p1.main(["--out-dir", str(tmp_path / "one"), "--steps", "6", *run, *common_args])
    p1.main(["--out-dir", str(tmp_path / "two"), "--steps", "3", *run, *common_args])
    p1.main(["--out-dir", str(tmp_path / "two"), "--steps", "6", "--resume", *common_args])   # no flags repeated
    one, two = load_ckpt(tmp_path / "one" / "ckpt.pt"), load_ckpt(tmp_path / "two" / "ckpt.pt")
    assert two["config"]["batch_size"] == 8 and two["config"]["lr"] == 0.002
    for k in one["model"]:
        assert torch.equal(one["model"][k], two["model"][k]), k       # the same run as without the stop
    capsys.readouterr()
    p1.main(["--out-dir", str(tmp_path / "two"), "--steps", "7", "--resume", "--batch-size", "4", *common_args])
    assert "--batch-size 4, not the checkpoint's 8" in capsys.readouterr().err        # a change is named
    assert load_ckpt(tmp_path / "two" / "ckpt.pt")["config"]["batch_size"] == 4
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["config"]["batch_size"] == 4


def test_empty_class_folders_and_what_is_not_an_image_are_skipped_with_a_warning(tmp_path, capsys):
    for name in ("daisy", "rose"):
        os.makedirs(tmp_path / name)
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    os.makedirs(tmp_path / "empty")
    os.symlink(tmp_path, tmp_path / "loop")                          # a link back to the top: no images either
    (tmp_path / "rose" / "notes.txt").write_text("x")
    (tmp_path / "rose" / ".DS_Store").write_text("x")                # hidden: not worth a word
    os.makedirs(tmp_path / "rose" / "more")
    data = common.load_image_folder(str(tmp_path), 8)
    assert data.classes == ["daisy", "rose"] and data.labels.tolist() == [0, 1]
    err = capsys.readouterr().err
    assert all(w in err for w in ("empty/", "loop/", "rose/notes.txt", "rose/more")) and ".DS_Store" not in err
    image = tmp_path / "daisy" / "0.png"
    with pytest.raises(SystemExit, match="is not a folder"):
        common.load_image_folder(str(image), 8)


def test_a_vae_interrupted_before_its_psnr_and_pictures_gets_them_on_the_rerun(tmp_path, tiny_clip, monkeypatch):
    from test_phase5 import TINY, write_flower_folder
    command = ["--data", write_flower_folder(str(tmp_path / "flowers"), per_class=4), "--clip-model", tiny_clip,
               "--out-dir", str(tmp_path / "run"), "--vae-steps", "2", "--steps", "1", *map(str, TINY)]
    pictures = p5.save_vae_pictures

    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(p5, "save_vae_pictures", ctrl_c)            # stage 1 is over, its results not yet written
    with pytest.raises(KeyboardInterrupt):
        p5.main(command)
    assert load_ckpt(tmp_path / "run" / "vae.pt")["step"] == 2 and not (tmp_path / "run" / "ckpt.pt").exists()
    monkeypatch.setattr(p5, "save_vae_pictures", pictures)
    p5.main(command)                                                  # the same command: the results, then the flow
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(metrics["vae_psnr_db"]) and (tmp_path / "run" / "recon.png").exists()
    assert load_ckpt(tmp_path / "run" / "vae.pt")["config"]["psnr_db"] == metrics["vae_psnr_db"]


def test_an_interrupt_while_the_pictures_are_drawn_keeps_the_training_metrics(tmp_path, mnist_root, monkeypatch):
    command = ["--data-root", mnist_root, "--out-dir", str(tmp_path), *FAST, "--steps", "3"]

    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(p1, "generate", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        p1.main(command)
    metrics = (tmp_path / "metrics.json").read_text()
    assert json.loads(metrics)["steps"] == 3
    monkeypatch.undo()
    p1.main(command)                                                  # samples, and keeps the training's numbers
    assert (tmp_path / "samples.png").exists() and (tmp_path / "metrics.json").read_text() == metrics


@pytest.mark.parametrize("phase", [p1, p3, p5])
@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_a_seed_outside_64_bits_is_one_line(phase, seed, capsys):
    with pytest.raises(SystemExit):
        phase.get_args(["--seed", seed])
    assert "--seed" in capsys.readouterr().err
    assert phase.get_args(["--seed", str(2**64 - 1)]).seed == 2**64 - 1
    torch.Generator().manual_seed(2**64 - 1), torch.manual_seed(2**64 - 1)   # the largest is a seed torch takes


@pytest.mark.parametrize("phase", [p4, p5])
def test_at_files_with_a_byte_order_mark_blank_lines_or_other_bytes(phase, tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("\ufeff--prompt=a red car\n\n--prompt=two dogs\n", encoding="utf-8")
    assert phase.get_args([f"@{good}"]).prompt == ["a red car", "two dogs"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes("--prompt=un caf\u00e9\n".encode("latin-1"))
    with pytest.raises(SystemExit):
        phase.get_args([f"@{bad}"])
    assert "not UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        phase.get_args(["--help"])
    assert "@FILE" in capsys.readouterr().out


def test_evaluate_refuses_too_many_samples_unread_and_ctrl_c_is_one_line(tmp_path, monkeypatch):
    np.savez(tmp_path / "s.npz", images=np.zeros((6, 28, 28), np.uint8))
    monkeypatch.setattr(evaluate, "MAX_SAMPLES", 5)
    with pytest.raises(SystemExit, match="holds 6 images; score at most 5"):
        evaluate.load_samples(str(tmp_path / "s.npz"))
    interrupt = ("import runpy, sys, evaluate\n"
                 "def ctrl_c(*a, **k): raise KeyboardInterrupt\n"
                 "sys.modules['common'].load_dataset = ctrl_c\n"
                 f"sys.argv = ['evaluate.py', {str(tmp_path / 's.npz')!r}, '--device', 'cpu']\n"
                 "runpy.run_path('evaluate.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", interrupt], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "FLOWMATCH_CACHE": str(tmp_path / "cache")})
    assert_clean_error(r, "interrupted")


def test_thousands_of_prompts_are_drawn_in_the_pictures_sixteen_at_most(tmp_path, tiny_clip, monkeypatch, capsys):
    from test_phase4 import TINY, write_cifar_folder
    out = str(tmp_path / "run")
    p4.main(["--data-root", write_cifar_folder(str(tmp_path / "data")), "--clip-model", tiny_clip, "--out-dir", out,
             "--steps", "1", *map(str, TINY)])
    assert "loading CLIP" in capsys.readouterr().out           # said before a download can keep it waiting
    seen, draw = [], p4.sample_with_attention
    monkeypatch.setattr(p4, "sample_with_attention", lambda model, ids, *a: seen.append(len(ids)) or draw(model, ids,
                                                                                                         *a))
    prompts = [f"a photo of a dog number {i}" for i in range(20)]
    p4.main(["--out-dir", out, "--num-samples", "1", "--sample-steps", "2", "--device", "cpu",
             *[f"--prompt={p}" for p in prompts]])
    assert seen == [16]
    with Image.open(os.path.join(out, "samples.png")) as samples:
        assert samples.height > 20 * 64                                  # the samples: every prompt


def test_unclear_messages_made_clear(tmp_path, mnist_root, capsys):
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        common.number(float)("inf")
    (tmp_path / "x.npz").mkdir()
    with pytest.raises(argparse.ArgumentTypeError, match="x.npz' is a folder"):
        common.npz_file(str(tmp_path / "x"))
    p1.main(["--data-root", mnist_root, "--out-dir", str(tmp_path / "run"), *FAST, "--steps", "100000",
             "--max-minutes", "0.001"])
    assert "--max-minutes reached: --resume trains on" in capsys.readouterr().out
