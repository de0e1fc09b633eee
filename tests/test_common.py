import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import OFFLINE_ENV, write_idx_mnist


def test_auto_device_is_available_one():
    device = common.get_device("auto")
    assert device.type in ("cpu", "cuda", "mps")
    if torch.cuda.is_available():
        assert device.type == "cuda"
    torch.zeros(1, device=device)  # and usable


def test_cpu_always_works():
    assert common.get_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu0", ""])
def test_unknown_device_is_a_clear_error(name):
    with pytest.raises(SystemExit, match="unknown --device"):
        common.get_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_absent_cuda_is_a_clear_error():
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        common.get_device("cuda")


def test_autocast_bf16_runs_matmuls_in_bf16_and_fp32_does_not():
    cpu = torch.device("cpu")
    with common.autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with common.autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_mnist_idx_through_torchvision(tmp_path):
    images, labels = write_idx_mnist(str(tmp_path), n_train=30, n_test=12)
    data = common.load_dataset("mnist", str(tmp_path), train=False)
    assert data.images.dtype == torch.uint8 and data.images.shape == (12, 1, 28, 28)
    assert data.labels.dtype == torch.int64
    assert np.array_equal(data.images[:, 0].numpy(), images) and np.array_equal(data.labels.numpy(), labels)
    assert data.classes == [str(i) for i in range(10)]


def test_random_batch_is_scaled_and_matches_labels(tmp_path):
    write_idx_mnist(str(tmp_path), n_train=30, n_test=12)
    data = common.load_dataset("mnist", str(tmp_path), train=True)
    torch.manual_seed(0)
    x, y = data.random_batch(16)
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1  # the bar is 255 -> +1
    # every image's bar sits where its label says (see conftest.synthetic_digits)
    for img, label in zip(x, y):
        assert (img[0, 4:24, 2 + 2 * label: 4 + 2 * label] == 1).all()


def write_image_folder(root, sizes):
    """Two classes of solid-colour images of the given (w, h) sizes."""
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for cls, colour in colours.items():
        os.makedirs(os.path.join(root, cls))
        for i, size in enumerate(sizes):
            Image.new("RGB", size, colour).save(os.path.join(root, cls, f"{i}.png"))


def test_image_folder_resized_cropped_and_cached(tmp_path, monkeypatch):
    folder = str(tmp_path / "pets")
    write_image_folder(folder, [(40, 30), (32, 32), (20, 50)])
    data = common.load_dataset(folder, root=None, image_size=16)
    assert data.images.shape == (6, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert (data.images[0, 0] == 255).all() and (data.images[0, 2] == 0).all()   # cat = red
    assert (data.images[3, 2] == 255).all()                                        # dog = blue
    cached = os.listdir(os.environ["FLOWMATCH_CACHE"])
    assert len(cached) == 1 and cached[0].endswith(".pt")
    # The second load reads the cache: PIL is never asked to open an image.
    monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = common.load_dataset(folder, root=None, image_size=16)
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)


def test_cifar10_prefers_image_folder_copy(tmp_path):
    write_image_folder(str(tmp_path / "cifar10" / "train"), [(32, 32)])
    data = common.load_dataset("cifar10", str(tmp_path), train=True)
    assert data.images.shape == (2, 3, 32, 32) and data.classes == ["cat", "dog"]


def test_missing_mnist_offline_is_a_clear_error(tmp_path, monkeypatch):
    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        common.load_dataset("mnist", str(tmp_path / "empty"), train=True)
    assert "--data-root" in str(e.value) and "MNIST" in str(e.value)


def test_unreadable_images_are_skipped_with_one_warning(tmp_path, capsys):
    folder = tmp_path / "mine"
    write_image_folder(str(folder), [(40, 30)])
    (folder / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    data = common.load_dataset(str(folder), root=None, image_size=16)
    assert data.images.shape == (2, 3, 16, 16) and data.labels.tolist() == [0, 1]
    assert "broken.jpg" in capsys.readouterr().err


def test_an_edited_folder_is_decoded_again(tmp_path):
    folder = tmp_path / "mine"
    write_image_folder(str(folder), [(40, 30)])
    first = common.load_dataset(str(folder), root=None, image_size=16)
    Image.new("RGB", (16, 16), (0, 255, 0)).save(folder / "dog" / "extra.png")
    assert len(common.load_dataset(str(folder), root=None, image_size=16).images) == len(first.images) + 1


@pytest.mark.parametrize("text, ok", [("3", True), ("0", False), ("-2", False), ("nan", False), ("inf", False),
                                      ("x", False)])
def test_number_flags_are_finite_and_in_range(text, ok):
    import argparse
    parse = common.number(float)
    if ok:
        assert parse(text) == 3.0
    else:
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            parse(text)
    assert common.number(float, 0, True)("0") == 0.0


# ----------------------------------------------------------------------------------------------------------
# Never lose a file: atomic writes, a full disk, a cache folder that cannot be written

def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    common.atomic_write(str(path), lambda f: f.write(b"good"))
    assert path.read_bytes() == b"good" and os.listdir(tmp_path) == ["ckpt.pt"]

    def full_disk(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(SystemExit, match="disk full.*previous one is kept"):
        common.atomic_write(str(path), full_disk)
    assert path.read_bytes() == b"good" and os.listdir(tmp_path) == ["ckpt.pt"]   # no .tmp left behind
    with pytest.raises(SystemExit, match="nothing was written"):               # torch.save says RuntimeError
        common.atomic_write(str(tmp_path / "new.pt"), lambda f: (_ for _ in ()).throw(RuntimeError("writer failed")))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_an_unwritable_cache_folder_is_a_warning_and_the_data_still_loads(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "mine"
    write_image_folder(str(folder), [(40, 30)])
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("FLOWMATCH_CACHE", str(blocker))   # a file, not a folder
    data = common.load_dataset(str(folder), root=None, image_size=16)
    assert data.images.shape == (2, 3, 16, 16)
    assert "cannot write the cache folder" in capsys.readouterr().err


def test_a_dangling_link_and_a_huge_image_are_skipped_like_broken_files(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "mine"
    write_image_folder(str(folder), [(40, 30)])
    os.symlink(tmp_path / "gone.jpg", folder / "cat" / "link.jpg")
    Image.new("RGB", (64, 64)).save(folder / "dog" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 64x64 is more than twice that: PIL refuses it
    data = common.load_dataset(str(folder), root=None, image_size=16)
    assert len(data.images) == 2
    err = capsys.readouterr().err
    assert "link.jpg" in err and "huge.png" in err


def test_save_npz_names_a_file():
    import argparse
    assert common.npz_file("out/s") == "out/s.npz" and common.npz_file("s.npz") == "s.npz"
    for folder in ("out/", "."):
        with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
            common.npz_file(folder)


def test_finite_stops_on_nan_and_inf():
    assert common.finite(None, 0) is None and common.finite(torch.tensor(0.25), 3) == 0.25
    for bad in (float("nan"), float("inf")):
        with pytest.raises(SystemExit, match="diverged"):
            common.finite(torch.tensor(bad), 7)


def test_other_data_is_refused_and_an_old_config_learns_its_data():
    data = common.ImageData(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.zeros(5, dtype=torch.long), ["a", "b"])
    config = {}
    common.check_same_data(config, data, "mine", "ckpt.pt")   # a checkpoint that did not record it: it does now
    assert config["data"] == {"dataset": "mine", "classes": ["a", "b"], "images": 5}
    common.check_same_data(config, data, "mine", "ckpt.pt")
    fewer = common.ImageData(data.images[:4], data.labels[:4], data.classes)
    for other, name in ((fewer, "mine"), (data, "yours"), (common.ImageData(data.images, data.labels, ["a"]), "mine")):
        with pytest.raises(SystemExit, match="was trained on mine"):
            common.check_same_data(config, other, name, "ckpt.pt")


# ----------------------------------------------------------------------------------------------------------
# Measuring the step

def test_step_flops_counts_forward_and_backward_and_draws_no_random_numbers():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8)
    torch.manual_seed(1)
    flops = common.step_flops(lambda: (layer(x + torch.randn_like(x)) ** 2).mean())
    # forward: a (16x8) @ (8x4) matmul, 2*16*8*4 FLOPs; backward: the weight's gradient, the same again
    assert flops == 2 * (2 * 16 * 8 * 4)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))   # the random numbers the step drew were put back
    assert common.gpu_mfu(flops * 100.0) is None or torch.cuda.is_available()   # no MFU off CUDA


def test_a_model_counted_before_its_first_call_is_still_compiled():
    """Up to PyTorch 2.13, a compiled model's first call under FlopCounterMode left it uncompiled for good."""
    from torch._dynamo.utils import counters

    class Net(torch.nn.Module):  # its own class: a code object no other test has compiled
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 4)

        def forward(self, x):
            return torch.sin(self.layer(x))

    net, x = Net(), torch.randn(16, 8)
    net.compile(backend="eager")   # dynamo only: what is tested is whether the frame is compiled
    counters.clear()
    assert common.step_flops(lambda: net(x).sum()) == 2 * 16 * 8 * 4 * 2   # forward and the weight's gradient
    net(x)
    assert counters["frames"]["ok"] >= 1
