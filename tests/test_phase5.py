import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import phase5_latent as p5
from common import ImageData
from conftest import OFFLINE_ENV, ROOT, TORCHRUN_ENV, assert_clean_error, load_ckpt, run_script


def test_vae_shapes():
    vae = p5.VAE(8, 4)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (3, 4, 16, 16)      # 12,288 numbers -> 1,024
    recon, m, lv = vae(x)
    assert recon.shape == x.shape and torch.equal(m, mean)
    assert vae.decode(mean).shape == (3, 3, 64, 64)


def test_kl_is_zero_for_a_standard_normal_posterior_and_positive_otherwise():
    zeros = torch.zeros(2, 4, 16, 16)
    assert p5.kl_divergence(zeros, zeros).item() == 0
    assert p5.kl_divergence(zeros + 0.5, zeros).item() == pytest.approx(0.125)     # 0.5 * mean^2
    assert p5.kl_divergence(zeros, zeros + 1.0).item() > 0


def random_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g),
                     torch.arange(n) % 3, ["daisy", "rose", "tulip"])


def test_every_image_and_its_mirror_is_encoded_with_its_label():
    torch.manual_seed(0)
    vae = p5.VAE(8, 4).eval()
    data = random_images(20)
    latents, labels = p5.encode_dataset(vae, data, batch=8)
    assert latents.shape == (40, 4, 16, 16) and labels.tolist().count(0) == 2 * 7
    x = data.images[:1].float() / 127.5 - 1
    with torch.no_grad():
        assert torch.allclose(latents[0], vae.encode(x)[0][0], atol=1e-5)             # the posterior mean
        assert torch.allclose(latents[8], vae.encode(x.flip(3))[0][0], atol=1e-5)     # its mirror: next chunk
    batch, y = p5.LatentData(latents, labels, data.classes).random_batch(5)
    assert batch.shape == (5, 4, 16, 16) and y.shape == (5,)


def test_psnr_is_high_for_a_perfect_decoder_and_finite_for_a_random_one():
    class Identity(torch.nn.Module):
        def encode(self, x):
            return x, x

        def decode(self, z):
            return z

    images = random_images(4).images
    assert p5.psnr_db(Identity(), images) > 60
    assert 0 < p5.psnr_db(p5.VAE(8, 4).eval(), images) < 20


def test_class_of_prompt_prefers_the_longest_name():
    classes = ["lily", "water lily", "rose", "desert-rose"]
    assert p5.class_of_prompt("a photo of a water lily.", classes) == 1
    assert p5.class_of_prompt("a photo of a rose", classes) == 2
    assert p5.class_of_prompt("a photo of a desert-rose", classes) == 3
    assert p5.class_of_prompt("a cat", classes) == -1


def write_flower_folder(root, per_class=8):
    for i, name in enumerate(["daisy", "rose", "tulip"]):
        os.makedirs(os.path.join(root, name))
        for j in range(per_class):
            Image.new("RGB", (80, 64), (80 * i, 20 * j, 255 - 80 * i)).save(os.path.join(root, name, f"{j}.png"))
    return root


TINY = ["--depth", 1, "--width", 32, "--batch-size", 4, "--sample-steps", 2, "--device", "cpu", "--num-samples", 2]


def test_cli_trains_both_stages_then_samples_then_resumes_the_flow_only(tmp_path, tiny_clip):
    folder = write_flower_folder(str(tmp_path / "flowers"))
    with open(os.path.join(folder, "rose", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")  # one bad file in a user's folder: skipped with a warning
    out = tmp_path / "run"
    common = ["--data", folder, "--clip-model", tiny_clip, "--out-dir", out, *TINY]
    r = run_script("phase5_latent.py", "--vae-steps", 2, "--steps", 3, "--prompt", "a photo of a rose",
                   "--save-npz", tmp_path / "s.npz", *common)
    assert r.returncode == 0, r.stderr
    assert "broken.jpg" in r.stderr and "Traceback" not in r.stderr
    for name in ("samples.png", "trajectory.png", "trajectory.gif", "steps.png", "progress.png", "cfg_sweep.png",
                 "attention.png", "recon.png", "latents.png", "ckpt.pt", "vae.pt", "metrics.json"):
        assert (out / name).exists(), name
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].shape == (2, 64, 64, 3) and npz["labels"].tolist() == [1, 1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and np.isfinite(metrics["vae_psnr_db"])
    ckpt = load_ckpt(out / "ckpt.pt")
    assert ckpt["phase"] == 5 and ckpt["config"]["classes"] == ["daisy", "rose", "tulip"]
    assert ckpt["config"]["latent_scale"] > 0 and ckpt["config"]["vae_step"] == 2
    # Both checkpoints exist: the next call samples straight away, and leaves the training metrics alone. It needs
    # no data: the scale and the class names (for the npz labels) come from the checkpoint.
    r = run_script("phase5_latent.py", "--data-root", tmp_path / "nowhere", "--out-dir", out, "--num-samples", 1,
                   "--sample-steps", 2, "--device", "cpu", "--prompt", "two tulips", "--save-npz", tmp_path / "t.npz")
    assert r.returncode == 0, r.stderr
    assert "training" not in r.stdout and "latents:" not in r.stdout
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert np.load(tmp_path / "t.npz")["labels"].tolist() == [2]
    # --resume trains the flow further; the VAE its latents came from is left alone, whatever --vae-steps says
    vae_before = (out / "vae.pt").read_bytes()
    r = run_script("phase5_latent.py", "--resume", "--vae-steps", 4, "--steps", 5, *common)
    assert r.returncode == 0, r.stderr
    assert "stage 1" not in r.stdout and "from step 3 to 5" in r.stdout
    assert load_ckpt(out / "ckpt.pt")["step"] == 5 and (out / "vae.pt").read_bytes() == vae_before


def test_the_vae_resumes_before_the_flow_exists(tmp_path, tiny_clip):
    folder = write_flower_folder(str(tmp_path / "flowers"), per_class=4)
    out = tmp_path / "run"
    common = ["--data", folder, "--clip-model", tiny_clip, "--out-dir", out, *TINY]
    out.mkdir()
    vae = p5.VAE(p5.VAE_WIDTH, 4)  # a VAE stopped at step 2 (say, by Ctrl-C)
    p5.save_checkpoint(str(out / "vae.pt"), vae, vae, torch.optim.AdamW(vae.parameters()), 2, {}, {})
    r = run_script("phase5_latent.py", "--resume", "--vae-steps", 3, "--steps", 1, *common)
    assert r.returncode == 0, r.stderr
    assert "from step 2 to 3" in r.stdout and load_ckpt(out / "vae.pt")["step"] == 3
    assert load_ckpt(out / "ckpt.pt")["config"]["vae_step"] == 3


def test_a_flow_without_its_vae_and_a_phase4_checkpoint_are_clean_errors(tmp_path, tiny_clip):
    folder = write_flower_folder(str(tmp_path / "flowers"), per_class=2)
    torch.save({"phase": 5, "config": {}, "step": 5}, tmp_path / "ckpt.pt")
    r = run_script("phase5_latent.py", "--data", folder, "--clip-model", tiny_clip, "--out-dir", tmp_path, *TINY)
    assert_clean_error(r, "no trained VAE")
    torch.save({"phase": 4, "config": {}, "step": 5}, tmp_path / "ckpt.pt")
    r = run_script("phase5_latent.py", "--data", folder, "--clip-model", tiny_clip, "--out-dir", tmp_path, *TINY)
    assert_clean_error(r, "phase 4")
    assert not (tmp_path / "vae.pt").exists()   # nothing written into another phase's folder


SPY = """
import os, sys, torch
sys.path.insert(0, {root!r})
import phase5_latent as p5
train = p5.train
def spy(args, model, *rest):  # after training: this process's weights, to compare the processes
    result = train(args, model, *rest)
    weights = {{k.removeprefix("module."): v for k, v in model.state_dict().items()}}
    torch.save(weights, os.path.join(args.out_dir, "weights-%s-%d.pt" % (os.environ.get("RANK", "0"), args.steps)))
    return result
p5.train = spy
p5.main(sys.argv[1:])
"""


def test_torchrun_two_processes_train_the_flow_like_one_process_with_the_whole_batch(tmp_path, tiny_clip):
    spy = tmp_path / "spy.py"
    spy.write_text(SPY.format(root=ROOT))
    folder = write_flower_folder(str(tmp_path / "flowers"))
    common = ["--data", folder, "--clip-model", tiny_clip, *map(str, TINY), "--precision", "fp32"]
    # One VAE for both (stage 1 shards its reparameterisation noise, so its runs agree in distribution only).
    assert run_script("phase5_latent.py", "--out-dir", tmp_path / "vae", "--vae-steps", 2, "--steps", 1,
                      *common).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, **OFFLINE_ENV, **TORCHRUN_ENV}
    for name, launch, runs in (("one", [sys.executable], [["--steps", "5"]]),  # two: 3 steps, then resumed to 5
                               ("two", torchrun, [["--steps", "3"], ["--steps", "5", "--resume"]])):
        os.makedirs(tmp_path / name)
        shutil.copy(tmp_path / "vae" / "vae.pt", tmp_path / name / "vae.pt")
        for extra in runs:
            r = subprocess.run([*launch, str(spy), "--out-dir", str(tmp_path / name), *extra, *common], cwd=ROOT,
                               capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
    two = [torch.load(tmp_path / "two" / f"weights-{rank}-5.pt") for rank in (0, 1)]
    one = torch.load(tmp_path / "one" / "weights-0-5.pt")
    assert load_ckpt(tmp_path / "two" / "ckpt.pt")["step"] == 5                   # written by process 0
    for k in one:
        assert torch.equal(two[0][k], two[1][k]), k                              # the copies hold the same weights
        assert torch.allclose(two[0][k], one[k], atol=1e-5, rtol=1e-4), (k, (two[0][k] - one[k]).abs().max())
    assert (tmp_path / "two" / "samples.png").exists()


def test_torchrun_needs_a_batch_it_can_share(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
                        os.path.join(ROOT, "phase5_latent.py"), "--out-dir", str(tmp_path), *map(str, TINY)],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV, **TORCHRUN_ENV},
                       timeout=300)
    assert r.returncode != 0 and "cannot share --batch-size 4" in r.stderr


def test_resume_with_other_data_is_refused(tmp_path, tiny_clip):
    out = tmp_path / "run"
    common = ["--clip-model", tiny_clip, "--out-dir", str(out), "--vae-steps", "2", *map(str, TINY)]
    p5.main(["--data", write_flower_folder(str(tmp_path / "a")), "--steps", "2", *common])
    before = (out / "ckpt.pt").read_bytes()
    other = write_flower_folder(str(tmp_path / "b"), per_class=5)     # the same 3 classes, other pictures
    with pytest.raises(SystemExit, match="was trained on"):
        p5.main(["--data", other, "--steps", "4", "--resume", *common])
    assert (out / "ckpt.pt").read_bytes() == before


def test_a_stopped_vae_is_finished_by_the_same_command_before_any_flow(tmp_path, tiny_clip, monkeypatch):
    folder = write_flower_folder(str(tmp_path / "flowers"), per_class=4)
    command = ["--data", folder, "--clip-model", tiny_clip, "--out-dir", str(tmp_path), "--vae-steps", "3",
               "--steps", "1", *map(str, TINY)]
    loss, calls = p5.VAETrainer.loss, []

    def ctrl_c_at_the_second_step(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return loss(self, *args)
    monkeypatch.setattr(p5.VAETrainer, "loss", ctrl_c_at_the_second_step)
    with pytest.raises(SystemExit, match="saved at step 1; the same command goes on"):
        p5.main(command)
    assert load_ckpt(tmp_path / "vae.pt")["step"] == 1 and not (tmp_path / "ckpt.pt").exists()
    monkeypatch.setattr(p5.VAETrainer, "loss", loss)
    p5.main(command)                                                  # no --resume: the VAE first, then the flow
    assert load_ckpt(tmp_path / "vae.pt")["step"] == 3 and load_ckpt(tmp_path / "ckpt.pt")["config"]["vae_step"] == 3


def test_too_few_images_and_rank_without_torchrun_are_one_line(tmp_path, tiny_clip, monkeypatch):
    folder = write_flower_folder(str(tmp_path / "flowers"), per_class=3)   # 9 images
    command = ["--data", folder, "--clip-model", tiny_clip, "--out-dir", str(tmp_path / "o"), *map(str, TINY)]
    with pytest.raises(SystemExit, match="at least 10"):
        p5.main(command)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="not a torchrun launch"):
        p5.main(command)
