import numpy as np
import pytest
import torch
import torch.nn as nn

import phase3_cfg as p3
from conftest import load_ckpt, run_script


def small_model(seed=0):
    torch.manual_seed(seed)
    model = p3.ConditionalDiT((1, 28, 28), 4, 2, 32, 2, 10)
    for p in model.parameters():  # move off the zero init so that y and t really matter
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_labels_change_the_prediction():
    model = small_model()
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4)
    assert not torch.allclose(model(x, t, torch.full((4,), 3)), model(x, t, torch.full((4,), 7)))


def test_cfg_scale_1_is_conditional_and_scale_0_unconditional_exactly():
    model = small_model()
    x, t, y = torch.randn(6, 1, 28, 28), torch.rand(6), torch.arange(6)
    null = torch.full((6,), p3.NUM_CLASSES)
    with torch.no_grad():
        assert torch.equal(p3.guided_velocity(model, x, t, y, 1.0), model(x, t, y))
        assert torch.equal(p3.guided_velocity(model, x, t, y, 0.0), model(x, t, null))


def test_doubled_batch_cfg_equals_two_separate_passes(monkeypatch):
    monkeypatch.setattr(p3, "CFG_FROM", 0.0)                    # guided over the whole path
    monkeypatch.setattr(p3, "CFG_UNTIL", 1.0)
    model = small_model()
    x, t, y = torch.randn(6, 1, 28, 28), torch.rand(6), torch.arange(6)
    with torch.no_grad():
        v_c, v_u = model(x, t, y), model(x, t, torch.full((6,), 10))
        for s in (2.0, 4.5):
            assert torch.allclose(p3.guided_velocity(model, x, t, y, s), v_u + s * (v_c - v_u), atol=1e-5)


def test_outside_the_guided_interval_one_pass_gives_the_conditional_prediction(monkeypatch):
    monkeypatch.setattr(p3, "CFG_FROM", 0.3)
    monkeypatch.setattr(p3, "CFG_UNTIL", 0.8)
    model, x, y = small_model(), torch.randn(6, 1, 28, 28), torch.arange(6)
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    with torch.no_grad():
        for t0, guided in ((0.0, False), (0.29, False), (0.3, True), (0.79, True), (0.8, False), (0.99, False)):
            t = torch.full((6,), t0)
            v_c, v_u = model(x, t, y), model(x, t, torch.full((6,), p3.NUM_CLASSES))
            batches.clear()
            v = p3.guided_velocity(model, x, t, y, 5.0)
            assert batches == ([12] if guided else [6]), t0                    # one pass over 6, not 12
            assert torch.allclose(v, v_u + 5 * (v_c - v_u) if guided else v_c, atol=1e-5), t0
            batches.clear()                                             # cfg_sweep.png's last row: every t guided
            every_t = p3.guided_velocity(model, x, t, y, 5.0, (0, 1))
            assert torch.allclose(every_t, v_u + 5 * (v_c - v_u), atol=1e-5)
            assert batches == [12]


def test_label_dropout_rate_and_null_index():
    seen = []

    class Spy(nn.Module):
        def forward(self, x, t, y):
            seen.append(y.clone())
            return torch.zeros_like(x)

    torch.manual_seed(0)
    y = torch.randint(0, 10, (20000,))
    p3.get_conditional_loss(Spy(), torch.zeros(20000, 1, 2, 2), y, label_dropout=0.1)
    got = seen[0]
    dropped = got != y
    assert 0.09 < dropped.float().mean() < 0.11
    assert (got[dropped] == 10).all() and (got[~dropped] == y[~dropped]).all()
    p3.get_conditional_loss(Spy(), torch.zeros(100, 1, 2, 2), y[:100], label_dropout=0.0)
    assert torch.equal(seen[1], y[:100])


class ConstantPerLabel(nn.Module):
    """A 'model' whose flow ends at an image filled with y / 10: lets us see which label made which image."""
    image_shape = (1, 4, 4)

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        target = (y.float() / 10)[:, None, None, None].expand_as(x)
        return (target - x) / (1 - t)[:, None, None, None]


def test_sample_conditional_draws_each_requested_label():
    labels = torch.tensor([7, 2, 5])
    images, _ = p3.sample_conditional(ConstantPerLabel(), labels, cfg_scale=1.0, steps=5, noise=torch.randn(3, 1, 4, 4))
    for image, digit in zip(images, [7, 2, 5]):
        assert torch.allclose(image, torch.full_like(image, digit / 10), atol=1e-5)


@pytest.mark.parametrize("bad", [["--digit", "11"], ["--digit", "-1"], ["--digit", "x"], ["--digit"], ["--cfg-scale", "-1"],
                                 ["--cfg-scale", "nan"]])
def test_bad_digit_or_scale_is_a_clean_error(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as stop:  # in-process (fast): any other exception would be a traceback
        p3.main(["--out-dir", str(tmp_path), *bad])
    assert stop.value.code not in (0, None) and bad[0] in capsys.readouterr().err


def test_cli_trains_and_writes_everything(tmp_path, mnist_root):
    out = tmp_path / "run"
    r = run_script("phase3_cfg.py", "--data-root", mnist_root, "--out-dir", out, "--save-npz", tmp_path / "s.npz",
                   "--steps", 4, "--batch-size", 8, "--num-samples", 3, "--sample-steps", 3, "--depth", 2,
                   "--width", 32, "--device", "cpu", "--digit", "3", "5", "1")
    assert r.returncode == 0, r.stderr
    for name in ("samples.png", "trajectory.png", "trajectory.gif", "steps.png", "progress.png", "cfg_sweep.png",
                 "ckpt.pt", "metrics.json"):
        assert (out / name).exists(), name
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].shape == (9, 28, 28) and npz["labels"].tolist() == [1, 1, 1, 3, 3, 3, 5, 5, 5]
    assert load_ckpt(out / "ckpt.pt")["step"] == 4
    # sampling again from the checkpoint, one digit
    r = run_script("phase3_cfg.py", "--out-dir", out, "--digit", "7", "--num-samples", 2,
                   "--sample-steps", 2, "--save-npz", tmp_path / "t.npz", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "t.npz")["labels"].tolist() == [7, 7]


def test_sample_each_class_draws_the_classes_in_turn_from_the_generators_noise():
    model = small_model()
    images, labels = p3.sample_each_class(model, [2, 7], 3, 2.0, 2, torch.Generator().manual_seed(3))
    assert labels.tolist() == [2, 2, 2, 7, 7, 7] and images.shape == (6, 1, 28, 28)   # a row per class in the grid
    noise = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(images, p3.sample_conditional(model, labels, 2.0, 2, noise)[0], atol=1e-6)
