import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from PIL import Image

import phase1_flow as p1
from conftest import (OFFLINE_ENV, ROOT, assert_clean_error, cpp_compiler_with_openmp, load_ckpt, run_script,
                      write_idx_mnist)

ROOT_DIR = pathlib.Path(__file__).resolve().parent.parent

FAST = ["--steps", 6, "--batch-size", 8, "--num-samples", 10, "--sample-steps", 4, "--width", 16,
        "--device", "cpu"]


def test_interpolation_endpoints_and_velocity():
    x0, x1 = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    xt, v = p1.interpolate(x0, x1, torch.zeros(4))
    assert torch.equal(xt, x0) and torch.equal(v, x1 - x0)
    xt, _ = p1.interpolate(x0, x1, torch.ones(4))
    assert torch.allclose(xt, x1)
    # v really is dx_t/dt: a finite difference along the line gives it back
    t = torch.rand(4)
    a, _ = p1.interpolate(x0, x1, t)
    b, _ = p1.interpolate(x0, x1, t + 1e-3)
    assert torch.allclose((b - a) / 1e-3, v, atol=1e-2)


def test_loss_is_zero_for_the_exact_field_of_a_single_point():
    # With one data point c, every line through x_t ends at c, so v(x, t) = (c - x) / (1 - t) is exact.
    torch.manual_seed(0)
    c = torch.randn(1, 1, 28, 28)
    exact = lambda x, t: (c - x) / (1 - t)[:, None, None, None]  # noqa: E731
    assert p1.flow_matching_loss(exact, c.expand(64, -1, -1, -1)).item() < 1e-6
    wrong = lambda x, t: -x  # noqa: E731
    assert p1.flow_matching_loss(wrong, c.expand(64, -1, -1, -1)).item() > 0.1


def test_t_sampling_ranges():
    t = p1.sample_t(10000, "cpu")
    assert t.min() >= 0 and t.max() < 1
    # logit-normal concentrates on the middle: far fewer samples near the ends than uniform (10% below 0.1)
    assert (t < 0.1).float().mean() < 0.05


def test_t_mean_moves_the_training_times_towards_the_noise_end():
    torch.manual_seed(0)
    centred, shifted = p1.sample_t(20000, "cpu"), p1.sample_t(20000, "cpu", -0.5)
    assert abs(centred.median().item() - 0.5) < 0.01
    assert abs(shifted.median().item() - torch.sigmoid(torch.tensor(-0.5)).item()) < 0.01  # 0.378
    assert p1.T_MEAN == -0.5


def test_euler_lands_exactly_on_a_single_data_point():
    c = torch.randn(3, 1, 28, 28)
    noise = torch.randn(3, 1, 28, 28)
    for steps in (1, 3, 50):
        x, _ = p1.euler_sample(lambda x, t: (c - x) / (1 - t)[:, None, None, None], noise, steps)
        assert torch.allclose(x, c, atol=1e-5), steps


def test_euler_integrates_a_constant_field_and_keeps_a_trajectory():
    noise, a = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 3.0)
    x, traj = p1.euler_sample(lambda x, t: a, noise, steps=8)
    assert torch.allclose(x, a)
    assert len(traj) == 9 and torch.equal(traj[0], noise) and torch.allclose(traj[4], a / 2)  # 4 of 8 steps: halfway


def test_autoguidance_extrapolates_from_the_guide():
    model = lambda x, t: torch.full_like(x, 2.0)  # noqa: E731
    guide = lambda x, t: torch.full_like(x, 0.5)  # noqa: E731
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    assert p1.autoguided(model, guide, 1.0) is model  # w = 1: the plain model, the guide is never run
    for w in (0.0, 3.0):
        assert torch.allclose(p1.autoguided(model, guide, w)(x, t), torch.full_like(x, 0.5 + w * 1.5))
    # guiding a model with itself changes nothing, whatever w
    assert torch.allclose(p1.autoguided(model, model, 5.0)(x, t), model(x, t))


def test_time_embedding_really_varies_over_unit_interval():
    emb = p1.TimeEmbedding(32)
    angles = torch.linspace(0, 1, 11)[:, None] * emb.freqs * torch.pi
    feats = torch.cat([angles.sin(), angles.cos()], 1)
    # neighbouring t (0.1 apart) give clearly different features
    assert (feats[1:] - feats[:-1]).norm(dim=1).min() > 1.0


def test_unet_output_shape_and_starts_at_zero():
    model = p1.UNet(1, 16)
    x, t = torch.randn(5, 1, 28, 28), torch.rand(5)
    v = model(x, t)
    assert v.shape == x.shape and torch.all(v == 0)  # zero-initialised head


def test_cli_trains_and_writes_everything(tmp_path, mnist_root):
    out = tmp_path / "run"
    r = run_script("phase1_flow.py", "--data-root", mnist_root, "--out-dir", out, "--save-npz", tmp_path / "s.npz",
                   *FAST)
    assert r.returncode == 0, r.stderr
    for name in ("samples.png", "trajectory.png", "trajectory.gif", "steps.png", "progress.png", "ckpt.pt",
                 "metrics.json"):
        assert (out / name).exists(), name
    assert not (out / "ckpt.pt.tmp").exists()
    with Image.open(out / "trajectory.gif") as gif:  # one frame per Euler step, and the noise it starts from
        assert gif.n_frames == 4 + 1
        assert gif.size == (8 * 57 + 1, 58)  # 8 digits drawn 2x in a row, as in the pictures
    with Image.open(out / "steps.png") as steps:    # one 56-pixel row (28 drawn 2x) and its 1-pixel gap per step count
        assert steps.height == len(p1.STEPS_ROWS) * 57 + 1
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].dtype == np.uint8 and npz["images"].shape == (10, 28, 28)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["params"] > 0 and metrics["train_images_per_s"] > 0
    assert np.isfinite(metrics["final_smooth_loss"])
    ckpt = load_ckpt(out / "ckpt.pt")
    assert ckpt["step"] == 6 and set(ckpt) >= {"model", "ema", "opt", "config"}


def run(capsys, *args):
    """Phase 1 in this process, as main(argv) (no interpreter start-up: faster than run_script); its stdout."""
    capsys.readouterr()
    p1.main([str(a) for a in args])
    return capsys.readouterr().out


def test_resume_reaches_the_same_state_as_one_run(tmp_path, mnist_root, capsys):
    common = ["--data-root", mnist_root, *FAST[2:]]
    run(capsys, "--out-dir", tmp_path / "a", "--steps", 6, *common)
    run(capsys, "--out-dir", tmp_path / "b", "--steps", 3, *common)
    assert "step 3" in run(capsys, "--out-dir", tmp_path / "b", "--steps", 6, "--resume", *common)
    a, b = load_ckpt(tmp_path / "a" / "ckpt.pt"), load_ckpt(tmp_path / "b" / "ckpt.pt")
    assert b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k


def test_guide_is_the_ema_at_guide_at_and_survives_resume(tmp_path, mnist_root, capsys):
    out = tmp_path / "run"
    common = ["--data-root", mnist_root, "--out-dir", out, *FAST[2:]]
    stdout = run(capsys, "--steps", 10, *common)
    assert f"autoguidance {p1.GUIDANCE:g} from step 3" in stdout  # the step after 20% of 10 steps
    first = load_ckpt(out / "ckpt.pt")
    assert first["guide_step"] == 3
    assert any(not torch.equal(first["guide"][k], first["ema"][k]) for k in first["ema"])  # an earlier model
    run(capsys, "--steps", 14, "--resume", *common)
    second = load_ckpt(out / "ckpt.pt")
    assert second["step"] == 14 and second["guide_step"] == 3
    for k in first["guide"]:
        assert torch.equal(first["guide"][k], second["guide"][k]), k


def test_guidance_changes_the_samples_and_old_checkpoints_sample_without_it(tmp_path, mnist_root, capsys):
    out = tmp_path / "run"
    run(capsys, "--data-root", mnist_root, "--out-dir", out, *FAST)
    sample = ["--out-dir", out, "--num-samples", 6, "--device", "cpu"]
    for name, extra in (("plain", ["--guidance", 1]), ("guided", [])):
        run(capsys, *sample, *extra, "--save-npz", tmp_path / f"{name}.npz")
    plain, guided = (np.load(tmp_path / f"{n}.npz")["images"] for n in ("plain", "guided"))
    assert not np.array_equal(plain, guided)
    # a checkpoint without a guide (e.g. from before autoguidance) samples as --guidance 1, and says so
    state = load_ckpt(out / "ckpt.pt")
    state["guide"], state["guide_step"] = None, None
    torch.save(state, out / "ckpt.pt")
    assert "no guidance" in run(capsys, *sample, "--save-npz", tmp_path / "old.npz")
    assert np.array_equal(np.load(tmp_path / "old.npz")["images"], plain)


def test_sample_only_is_reproducible_with_seed(tmp_path, mnist_root, capsys):
    out = tmp_path / "run"
    run(capsys, "--data-root", mnist_root, "--out-dir", out, *FAST)
    for name in ("x.npz", "y.npz"):
        run(capsys, "--out-dir", out, "--num-samples", 6, "--seed", 5, "--save-npz", tmp_path / name, "--device", "cpu")
    assert np.array_equal(np.load(tmp_path / "x.npz")["images"], np.load(tmp_path / "y.npz")["images"])


def test_max_minutes_stops_training_early(tmp_path, mnist_root):
    out = tmp_path / "run"
    r = run_script("phase1_flow.py", "--data-root", mnist_root, "--out-dir", out, *FAST, "--steps", 100000,
                   "--max-minutes", 0.001)
    assert r.returncode == 0, r.stderr
    assert 0 <= load_ckpt(out / "ckpt.pt")["step"] < 100000 and (out / "samples.png").exists()


def test_resume_without_checkpoint_is_a_clean_error(tmp_path):
    r = run_script("phase1_flow.py", "--out-dir", tmp_path / "nothing", "--resume")
    assert_clean_error(r, "no checkpoint")


def test_corrupt_checkpoint_is_a_clean_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = run_script("phase1_flow.py", "--out-dir", tmp_path)
    assert_clean_error(r, "unreadable")
    assert (tmp_path / "ckpt.pt").read_bytes() == b"not a checkpoint"  # nothing lost


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    torch.save({"config": {}, "step": 1, "x": Exploit()}, tmp_path / "ckpt.pt")
    r = run_script("phase1_flow.py", "--out-dir", tmp_path)
    assert_clean_error(r, "unreadable")
    assert not (ROOT_DIR / "pwned.txt").exists() and not (tmp_path / "pwned.txt").exists()


def test_a_rerun_samples_and_never_replaces_the_trained_checkpoint(tmp_path, mnist_root, capsys):
    out = tmp_path / "run"
    run(capsys, "--data-root", mnist_root, "--out-dir", out, *FAST)
    before = (out / "ckpt.pt").read_bytes()
    metrics = (out / "metrics.json").read_text()
    for extra in ([], ["--steps", 2], ["--resume", "--steps", 3]):  # plain rerun; fewer steps; resume below it
        stdout = run(capsys, "--data-root", mnist_root, "--out-dir", out, *FAST, *extra)
        assert "sampling from it" in stdout and "training" not in stdout
    assert (out / "ckpt.pt").read_bytes() == before and (out / "metrics.json").read_text() == metrics


def test_another_phases_checkpoint_is_refused(tmp_path):
    torch.save({"phase": 3, "config": {}, "step": 5}, tmp_path / "ckpt.pt")
    assert_clean_error(run_script("phase1_flow.py", "--out-dir", tmp_path), "phase 3")
    # an older checkpoint without the phase, of another model: a clean error too
    torch.save({"config": {"width": 16}, "step": 5, "model": {"w": torch.zeros(1)}, "ema": {}, "opt": {}},
               tmp_path / "ckpt.pt")
    assert_clean_error(run_script("phase1_flow.py", "--out-dir", tmp_path), "older version")


def test_unwritable_out_dir_fails_before_any_work(tmp_path, mnist_root):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_script("phase1_flow.py", "--data-root", mnist_root, "--out-dir", blocker / "run", *FAST)
    assert_clean_error(r, "cannot write")
    assert "training" not in r.stdout


def test_save_npz_name_gets_its_extension(tmp_path, mnist_root):
    r = run_script("phase1_flow.py", "--data-root", mnist_root, "--out-dir", tmp_path, *FAST,
                   "--save-npz", tmp_path / "run")
    assert r.returncode == 0 and (tmp_path / "run.npz").exists() and "run.npz" in r.stdout, r.stderr


def test_missing_dataset_offline_is_a_clean_error(tmp_path):
    r = run_script("phase1_flow.py", "--data-root", tmp_path / "no_data", "--out-dir", tmp_path / "o", *FAST)
    assert_clean_error(r, "--data-root")
    assert not (tmp_path / "no_data").exists()  # no empty folders left at a mistyped path


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--device", "tpu"], ["--width", "12"], ["--lr", "-1"],
                                 ["--lr", "nan"], ["--max-minutes", "nan"], ["--guidance", "nan"],
                                 ["--guidance", "-1"], ["--batch-size", "2.5"], ["--max-minutes", "inf"]])
def test_bad_flags_are_clean_errors(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as stop:  # in-process (fast): any other exception would be a traceback
        p1.main(["--out-dir", str(tmp_path), *bad])
    assert stop.value.code not in (0, None) and bad[0] in str(stop.value.code) + capsys.readouterr().err
    assert not (tmp_path / "ckpt.pt").exists()


def test_progress_rows_are_kept_across_resume_and_drawing_them_leaves_training_alone(tmp_path, mnist_root,
                                                                                     monkeypatch):
    args = ["--data-root", mnist_root, *map(str, FAST[2:])]
    p1.main(["--out-dir", str(tmp_path / "a"), "--steps", "4", *args])        # one row, at the end
    monkeypatch.setattr(p1, "CKPT_EVERY", 1)
    p1.main(["--out-dir", str(tmp_path / "b"), "--steps", "4", *args])        # a row after every step
    a, b = load_ckpt(tmp_path / "a" / "ckpt.pt"), load_ckpt(tmp_path / "b" / "ckpt.pt")
    assert [s for s, _ in a["progress"]] == [4] and [s for s, _ in b["progress"]] == [1, 2, 3, 4]
    assert torch.equal(a["progress"][0][1], b["progress"][-1][1])            # the same noise, the same model
    for k in a["model"]:  # drawing the 3 extra rows used none of training's random numbers: the same weights
        assert torch.equal(a["model"][k], b["model"][k]), k
    p1.main(["--out-dir", str(tmp_path / "b"), "--steps", "6", "--resume", *args])
    assert [s for s, _ in load_ckpt(tmp_path / "b" / "ckpt.pt")["progress"]] == [1, 2, 3, 4, 5, 6]
    with Image.open(tmp_path / "b" / "progress.png") as picture:
        assert picture.height == 6 * 57 + 1                                  # all 6 rows are in the picture


# ----------------------------------------------------------------------------------------------------------
# Never lose a trained model: NaN, a full disk, a kill, other data, a run stopped before its first step

def test_a_diverged_run_stops_with_one_line_and_keeps_the_good_checkpoint(tmp_path, mnist_root):
    args = ["--data-root", mnist_root, "--out-dir", str(tmp_path), *map(str, FAST[2:])]
    p1.main(["--steps", "3", *args])
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="diverged"):
        p1.main(["--steps", "6", "--resume", "--lr", "1e30", *args])     # the loss becomes inf, then NaN
    assert (tmp_path / "ckpt.pt").read_bytes() == before and sorted(os.listdir(tmp_path)) == sorted(
        ["ckpt.pt", "progress.png", "samples.png", "trajectory.png", "trajectory.gif", "steps.png", "metrics.json"])


def test_a_full_disk_keeps_the_last_checkpoint_and_progress_shows_only_what_is_saved(tmp_path, mnist_root,
                                                                                    monkeypatch):
    args = ["--data-root", mnist_root, "--out-dir", str(tmp_path), *map(str, FAST[2:])]
    p1.main(["--steps", "3", *args])
    before = (tmp_path / "ckpt.pt").read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="is the disk full.*previous one is kept"):
        p1.main(["--steps", "6", "--resume", *args])
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not [f for f in os.listdir(tmp_path) if "tmp" in f]
    with Image.open(tmp_path / "progress.png") as picture:
        assert picture.height == 1 * 57 + 1                           # the unsaved step-6 row is not drawn


def test_a_run_stopped_before_its_first_step_writes_no_checkpoint(tmp_path, mnist_root, monkeypatch):
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(p1, "flow_matching_loss", ctrl_c)
    with pytest.raises(SystemExit, match="before the first training step"):
        p1.main(["--data-root", mnist_root, "--out-dir", str(tmp_path), *map(str, FAST)])
    assert not (tmp_path / "ckpt.pt").exists()


def test_sigterm_saves_then_stops_at_once_with_a_non_zero_exit(tmp_path, mnist_root):
    cmd = [sys.executable, os.path.join(ROOT, "phase1_flow.py"), "--data-root", mnist_root, "--out-dir",
           str(tmp_path), *map(str, FAST[2:]), "--steps", "100000"]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, **OFFLINE_ENV})
    for line in run.stdout:  # wait until it trains (a line every 25 steps)
        if line.startswith("step 25/"):
            break
    run.send_signal(signal.SIGTERM)                                    # what `kill` and a cluster's preemption send
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1 and "interrupted: saving" in out and "Traceback" not in err, err
    assert "stopped by SIGTERM" in err and "--resume" in err                # a scheduler sees a stopped run
    assert load_ckpt(tmp_path / "ckpt.pt")["step"] >= 25
    assert not (tmp_path / "samples.png").exists() and not (tmp_path / "metrics.json").exists()  # no pictures drawn


def test_resume_on_other_data_is_refused(tmp_path, mnist_root):
    args = ["--out-dir", str(tmp_path / "run"), *map(str, FAST[2:])]
    p1.main(["--data-root", mnist_root, "--steps", "2", *args])
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    write_idx_mnist(str(tmp_path / "other"), n_train=50)             # another MNIST: 50 training images, not 64
    with pytest.raises(SystemExit, match="was trained on mnist \\(64 images"):
        p1.main(["--data-root", str(tmp_path / "other"), "--steps", "4", "--resume", *args])
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


def test_model_flags_a_checkpoint_overrides_are_named(tmp_path, mnist_root, capsys):
    args = ["--data-root", mnist_root, "--out-dir", str(tmp_path), *map(str, FAST[2:])]
    p1.main(["--steps", "2", *args])
    capsys.readouterr()
    p1.main([*args, "--width", "32"])                                 # the checkpoint's model is 16 wide
    assert "--width 32 ignored" in capsys.readouterr().err


def test_save_npz_into_a_folder_and_ctrl_c_outside_training_are_one_line(tmp_path, mnist_root):
    r = run_script("phase1_flow.py", "--out-dir", tmp_path, "--save-npz", str(tmp_path) + "/")
    assert_clean_error(r, "is a folder")
    interrupt = ("import runpy, sys, common\n"
                 "def ctrl_c(*a, **k): raise KeyboardInterrupt\n"
                 "common.load_dataset = ctrl_c\n"
                 f"sys.argv = ['phase1_flow.py', '--out-dir', {str(tmp_path)!r}]\n"
                 "runpy.run_path('phase1_flow.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", interrupt], cwd=ROOT, capture_output=True, text=True)
    assert_clean_error(r, "interrupted")


# ----------------------------------------------------------------------------------------------------------
# The fast path: torch.compile (on by default on CUDA; --compile turns it on here)

@pytest.mark.skipif(not cpp_compiler_with_openmp(), reason="torch.compile on the CPU needs a C++ compiler with "
                    "OpenMP (on a Mac: brew install llvm libomp, and CXX set to that clang++)")
def test_compiled_and_eager_give_the_same_loss_and_a_compiled_resume_reaches_one_compiled_run(tmp_path, mnist_root):
    args = ["--data-root", mnist_root, "--compile", "--precision", "fp32", *map(str, FAST[2:]), "--num-samples", "8",
            "--guidance", "1"]  # every sample batch 8 big, no guide: fewer graphs to compile
    p1.main(["--out-dir", str(tmp_path / "a"), "--steps", "6", *args])
    p1.main(["--out-dir", str(tmp_path / "b"), "--steps", "3", *args])
    p1.main(["--out-dir", str(tmp_path / "b"), "--steps", "6", "--resume", *args])
    a, b = load_ckpt(tmp_path / "a" / "ckpt.pt"), load_ckpt(tmp_path / "b" / "ckpt.pt")
    model = p1.UNet(1, 16)
    assert b["step"] == 6 and list(a["model"]) == list(model.state_dict())   # the same keys as without compile
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    # The trained model, eager and compiled, on one fixed batch: the same loss and gradients, to float precision.
    model.load_state_dict(a["model"])
    x1, results = torch.rand(8, 1, 28, 28) * 2 - 1, []
    for compiled in (False, True):
        if compiled:
            model.compile()
        torch.manual_seed(1)
        loss = p1.flow_matching_loss(model, x1)
        model.zero_grad()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (fast, fast_grads) = results
    assert torch.allclose(fast, eager, rtol=1e-4)
    for g, h in zip(eager_grads, fast_grads):
        assert torch.allclose(g, h, rtol=1e-3, atol=1e-5)
