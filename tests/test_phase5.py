import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import phase5_latent as p5
from common import ImageData
from conftest import assert_clean_error, load_ckpt, run_script


def test_vae_shapes():
    vae = p5.VAE(width=8)
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


def test_latents_are_normalised_to_unit_variance_and_cached(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vae = p5.VAE(width=8).eval()
    data = random_images(20)
    cache = str(tmp_path / "latents.pt")
    latents, scale = p5.encode_dataset(vae, data, vae_step=7, cache_path=cache, batch=8)
    assert latents.latents.shape == (40, 4, 16, 16)            # every image and its mirror
    assert latents.latents.std().item() == pytest.approx(1.0, abs=1e-4)
    assert scale > 0 and latents.labels.tolist().count(0) == 2 * 7
    x, y = latents.random_batch(5)
    assert x.shape == (5, 4, 16, 16) and y.shape == (5,)
    # The second call reads the cache: the encoder is never run again.
    monkeypatch.setattr(vae, "encode", lambda x: pytest.fail("encoded again"))
    again, scale2 = p5.encode_dataset(vae, data, vae_step=7, cache_path=cache)
    assert scale2 == scale and torch.equal(again.latents, latents.latents)
    # A retrained VAE (another step) must not reuse the old latents.
    with pytest.raises(BaseException, match="encoded again"):
        p5.encode_dataset(vae, data, vae_step=8, cache_path=cache)


def test_psnr_is_high_for_a_perfect_decoder_and_finite_for_a_random_one():
    class Identity(torch.nn.Module):
        def encode(self, x):
            return x, x

        def decode(self, z):
            return z

    images = random_images(4).images
    assert p5.psnr_db(Identity(), images) > 60
    assert 0 < p5.psnr_db(p5.VAE(width=8).eval(), images) < 20


def test_class_of_prompt_prefers_the_longest_name():
    classes = ["lily", "water lily", "rose", "desert-rose"]
    assert p5.class_of_prompt("a photo of a water lily, a type of flower.", classes) == 1
    assert p5.class_of_prompt("a photo of a rose", classes) == 2
    assert p5.class_of_prompt("a photo of a desert-rose", classes) == 3
    assert p5.class_of_prompt("a cat", classes) == -1


def write_flower_folder(root, per_class=8):
    for i, name in enumerate(["daisy", "rose", "tulip"]):
        os.makedirs(os.path.join(root, name))
        for j in range(per_class):
            Image.new("RGB", (80, 64), (80 * i, 20 * j, 255 - 80 * i)).save(os.path.join(root, name, f"{j}.png"))
    return root


TINY = ["--depth", 1, "--width", 32, "--heads", 2, "--batch-size", 4, "--vae-batch-size", 4, "--vae-width", 8,
        "--sample-steps", 2, "--device", "cpu", "--num-samples", 2]


def test_cli_trains_both_stages_resumes_the_vae_and_samples(tmp_path, tiny_clip):
    folder = write_flower_folder(str(tmp_path / "flowers"))
    out = tmp_path / "run"
    common = ["--data", folder, "--clip-model", tiny_clip, "--out-dir", out, *TINY]
    r = run_script("phase5_latent.py", "--stage", "vae", "--vae-steps", 2, *common)
    assert r.returncode == 0, r.stderr
    assert load_ckpt(out / "vae.pt")["step"] == 2 and (out / "recon.png").exists() and not (out / "ckpt.pt").exists()
    r = run_script("phase5_latent.py", "--stage", "vae", "--vae-steps", 4, *common)   # resumes from step 2
    assert r.returncode == 0, r.stderr
    assert "from step 2" in r.stdout and load_ckpt(out / "vae.pt")["step"] == 4
    r = run_script("phase5_latent.py", "--vae-steps", 4, "--steps", 3, "--prompt", "a photo of a rose",
                   "--save-npz", tmp_path / "s.npz", "--compare-pixel-speed", *common)
    assert r.returncode == 0, r.stderr
    assert "stage 1" not in r.stdout  # the VAE was done: only the flow trains
    for name in ("samples.png", "trajectory.png", "cfg_sweep.png", "recon.png", "latents.png", "ckpt.pt",
                 "latents.pt", "metrics.json"):
        assert (out / name).exists(), name
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].shape == (2, 64, 64, 3) and npz["labels"].tolist() == [1, 1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and np.isfinite(metrics["vae_psnr_db"]) and metrics["latent_scale"] > 0
    assert metrics["latent_speedup"] > 1
    ckpt = load_ckpt(out / "ckpt.pt")
    assert ckpt["config"]["image_shape"] == [4, 16, 16]
    assert ckpt["config"]["classes"] == ["daisy", "rose", "tulip"]
    assert ckpt["config"]["latent_scale"] == pytest.approx(metrics["latent_scale"], abs=1e-5)
    # Both checkpoints exist: the next call samples straight away, and leaves the training metrics alone. It needs
    # no data: the scale and the class names (for the npz labels) come from the checkpoint.
    r = run_script("phase5_latent.py", "--data-root", tmp_path / "nowhere", "--out-dir", out, "--num-samples", 1,
                   "--sample-steps", 2, "--device", "cpu", "--prompt", "two tulips", "--save-npz", tmp_path / "t.npz")
    assert r.returncode == 0, r.stderr
    assert "training" not in r.stdout and "latents:" not in r.stdout
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert np.load(tmp_path / "t.npz")["labels"].tolist() == [2]
    # The flow stage resumes from its own checkpoint (the finished VAE is left alone).
    r = run_script("phase5_latent.py", "--resume", "--vae-steps", 4, "--steps", 5, "--prompt", "a photo of a rose",
                   *common)
    assert r.returncode == 0, r.stderr
    assert "stage 1" not in r.stdout and "from step 3 to 5" in r.stdout
    assert load_ckpt(out / "ckpt.pt")["step"] == 5 and load_ckpt(out / "vae.pt")["step"] == 4


def test_flow_stage_without_vae_is_a_clean_error(tmp_path, tiny_clip):
    folder = write_flower_folder(str(tmp_path / "flowers"), per_class=2)
    r = run_script("phase5_latent.py", "--stage", "flow", "--data", folder, "--clip-model", tiny_clip,
                   "--out-dir", tmp_path / "o", *TINY)
    assert_clean_error(r, "--stage vae")
