import math

import numpy as np
import pytest
import torch

import phase2_dit as p2
from conftest import load_ckpt, run_script


@pytest.mark.parametrize("p", [1, 2, 4, 7])
def test_patchify_round_trip_is_exact(p):
    x = torch.randn(3, 2, 28, 28)
    tokens = p2.patchify(x, p)
    assert tokens.shape == (3, (28 // p) ** 2, p * p * 2)
    assert torch.equal(p2.unpatchify(tokens, p, 2, 28, 28), x)


def test_patchify_token_is_one_patch_in_row_major_order():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    tokens = p2.patchify(x, 2)
    assert tokens[0, 0].tolist() == [0, 1, 4, 5]      # top-left patch
    assert tokens[0, 1].tolist() == [2, 3, 6, 7]      # its right neighbour comes next
    assert tokens[0, 2].tolist() == [8, 9, 12, 13]    # then the next row


def test_2d_position_code_shape_distinct_and_separable():
    pe = p2.sincos_2d(64, 7, 7)
    assert pe.shape == (49, 64)
    assert torch.cdist(pe, pe).add(torch.eye(49) * 1e9).min() > 1e-3  # every position has its own code
    # moving one row down changes only the row half; one column right only the column half
    assert torch.equal(pe[0, 32:], pe[7, 32:]) and not torch.equal(pe[0, :32], pe[7, :32])
    assert torch.equal(pe[0, :32], pe[1, :32]) and not torch.equal(pe[0, 32:], pe[1, 32:])


def test_fresh_dit_block_is_exactly_the_identity():
    model = p2.DiT((1, 28, 28), 7, 2, 32, 2)
    x, c = torch.randn(4, 16, 32), torch.randn(4, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)


def test_dit_output_shape_and_time_changes_the_output_after_training_a_bit():
    model = p2.DiT((1, 28, 28), 7, 2, 32, 2)
    x, t = torch.randn(5, 1, 28, 28), torch.rand(5)
    assert model(x, t).shape == x.shape
    # once the zero-initialised layers move, t reaches the output through adaLN
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(model(x, torch.zeros(5)), model(x, torch.ones(5)))


def test_cli_trains_and_writes_everything(tmp_path, mnist_root):
    out = tmp_path / "run"
    r = run_script("phase2_dit.py", "--data-root", mnist_root, "--out-dir", out, "--save-npz", tmp_path / "s.npz",
                   "--steps", 4, "--batch-size", 8, "--num-samples", 6, "--sample-steps", 3, "--depth", 2,
                   "--width", 32, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout
    for name in ("samples.png", "trajectory.png", "trajectory.gif", "steps.png", "progress.png", "ckpt.pt",
                 "metrics.json"):
        assert (out / name).exists(), name
    assert np.load(tmp_path / "s.npz")["images"].shape == (6, 28, 28)
    ckpt = load_ckpt(out / "ckpt.pt")
    assert ckpt["config"]["patch_size"] == 7  # the default: 16 tokens of 7x7 pixels
    # autoguidance, as in phase 1: the guide is the EMA at --guide-at of the run, used for --guide-from <= t <
    # --guide-until, and it changes the samples
    guide_step = math.ceil(p2.GUIDE_AT * 4) + 1
    assert ckpt["guide_step"] == guide_step and f"autoguidance {p2.GUIDANCE:g} from step {guide_step}" in r.stdout
    assert p2.GUIDE_FROM > 0 and p2.GUIDE_UNTIL < 1  # phase 2 guides only the middle of the path
    assert ckpt["phase"] == 2
    r = run_script("phase2_dit.py", "--out-dir", out, "--num-samples", 6, "--sample-steps", 3,
                   "--guidance", 1, "--device", "cpu", "--save-npz", tmp_path / "plain.npz")
    assert r.returncode == 0, r.stderr
    assert not np.array_equal(np.load(tmp_path / "plain.npz")["images"], np.load(tmp_path / "s.npz")["images"])


@pytest.mark.parametrize("size", ["5", "3", "0"])
def test_bad_patch_size_is_a_clean_error(tmp_path, size, capsys):
    with pytest.raises(SystemExit) as stop:  # in-process (fast): --patch-size is a constant now, not a flag
        p2.main(["--out-dir", str(tmp_path), "--patch-size", size])
    assert stop.value.code == 2 and "--patch-size" in capsys.readouterr().err


def test_autoguidance_only_inside_its_interval():
    calls = []
    model = lambda x, t: torch.full_like(x, 2.0)  # noqa: E731
    guide = lambda x, t: calls.append(t[0].item()) or torch.full_like(x, 0.5)  # noqa: E731
    velocity, x = p2.autoguided(model, guide, 3.0, start=0.2, until=0.5), torch.randn(2, 1, 28, 28)
    assert torch.allclose(velocity(x, torch.full((2,), 0.25)), torch.full_like(x, 0.5 + 3.0 * 1.5))
    for t_out in (0.1, 0.5):  # before start and from until on: the plain model ...
        t_out = torch.full((2,), t_out)
        assert torch.equal(velocity(x, t_out), model(x, t_out))
    assert calls == [0.25]    # ... and the guide is not run
    # in the sampler: the guide runs only for the Euler steps that start inside [0.2, 0.5)
    calls.clear()
    p2.euler_sample(velocity, x, steps=10)
    assert calls == pytest.approx([0.2, 0.3, 0.4])
