"""The paths that run on Apple Silicon (MPS) and CUDA but never on this CPU: each device simulated where it can be."""
import ast
import os
import types

import pytest
import torch

import common
import evaluate
import phase1_flow as p1
import phase5_latent as p5
from conftest import ROOT
from test_tutorial import PHASES
FAST = ["--steps", "3", "--batch-size", "8", "--num-samples", "4", "--sample-steps", "2", "--width", "16",
        "--device", "cpu"]


def test_a_resume_reads_its_checkpoint_into_cpu_memory_so_progress_rows_join_on_any_device(tmp_path, mnist_root,
                                                                                          monkeypatch):
    """On CUDA and MPS, a checkpoint mapped onto the device put progress.png's rows there, and the resumed run's
    first save could not join them with its new row (kept on the CPU). Here any map_location but "cpu" stands for
    the training device and lands on the meta device, which, like a GPU's memory, mixes with no CPU tensor."""
    args = ["--data-root", mnist_root, "--out-dir", str(tmp_path), *FAST]
    p1.main(args)
    real_load = torch.load

    def load_onto_the_device(f, map_location=None, **kwargs):
        state = real_load(f, map_location="cpu", **kwargs)
        if map_location != "cpu":
            state["progress"] = [(s, x.to("meta")) for s, x in state.get("progress", [])]
        return state
    monkeypatch.setattr(torch, "load", load_onto_the_device)
    p1.main([*args, "--steps", "5", "--resume"])
    saved = real_load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["step"] == 5 and [s for s, _ in saved["progress"]] == [3, 5]


def test_evaluate_makes_no_float64_on_the_device(monkeypatch):
    """MPS has no float64: the scores' float64 copies are made on the CPU, after the arrays leave the device. On
    this CPU, a float64 tensor reaching .cpu() is one that would have been made on the device."""
    real_cpu = torch.Tensor.cpu

    def cpu(tensor, *args, **kwargs):
        assert tensor.dtype != torch.float64, "a float64 tensor was made on the device"
        return real_cpu(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    net = evaluate.Classifier(1, (8, 8, 8)).eval()
    probs, features = evaluate.classify(net, torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8), "cpu")
    assert probs.dtype == features.dtype == torch.float64 and probs.shape == (6, 10)


def test_the_random_state_of_the_device_that_trains_is_saved_and_restored(monkeypatch):
    """Batches, noise and t are drawn on the training device: its generator goes into the checkpoint beside the
    CPU's (MPS simulated: torch.mps's get/set_rng_state replaced by a fake generator)."""
    fake = {"state": torch.tensor([7, 7, 7], dtype=torch.uint8)}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: fake["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: fake.update(state=s))
    torch.manual_seed(1)
    saved = common.random_state(torch.device("mps"))
    assert torch.equal(saved["device_rng"], torch.tensor([7, 7, 7], dtype=torch.uint8))
    expected = torch.rand(3)                                    # what the run drew next
    fake["state"] = torch.tensor([1, 2, 3], dtype=torch.uint8)  # and the device's generator moved on too
    common.set_random_state(saved, torch.device("mps"))         # a resume
    assert torch.equal(fake["state"], torch.tensor([7, 7, 7], dtype=torch.uint8))    # the device's, put back
    assert torch.equal(torch.rand(3), expected)                                      # and the CPU's
    fake["state"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    common.set_random_state(saved, torch.device("cpu"))   # resumed on another kind of device: its state is not used
    assert fake["state"].tolist() == [1, 2, 3] and common.random_state(torch.device("cpu"))["device_rng"] is None


def fused_choices(path):
    """The `fused=` expression of every AdamW the script builds."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return [k.value for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "attr", "") ==
            "AdamW" for k in node.keywords if k.arg == "fused"]


@pytest.mark.parametrize("path", PHASES)
def test_adamw_is_fused_on_every_device(path):
    """Fused AdamW (one kernel for all the weights) runs on CUDA, the CPU and, since PyTorch 2.5, MPS."""
    choices = fused_choices(path)
    assert choices, "no AdamW with fused= found: the check would pass whatever the script says"
    for expression in choices:
        for kind in ("cuda", "cpu", "mps"):
            device = types.SimpleNamespace(type=kind)
            assert eval(compile(ast.Expression(expression), path, "eval"), {"device": device}) is True, (path, kind)


def test_compile_on_mps_needs_pytorch_2_8_and_is_off_by_default(monkeypatch):
    mps = torch.device("mps")
    assert common.use_compile(None, True, mps) is False and common.use_compile(None, True, torch.device("cuda"))
    monkeypatch.setattr(torch, "__version__", "2.7.1")
    with pytest.raises(SystemExit, match="needs PyTorch 2.8"):
        common.use_compile(True, True, mps)
    assert common.use_compile(True, True, torch.device("cpu")) is True
    monkeypatch.setattr(torch, "__version__", "2.8.0+cpu")
    assert common.use_compile(True, True, mps) is True


def test_torchrun_on_apple_silicon_is_refused_in_one_line(monkeypatch):
    """gloo carries no MPS tensors: the processes would not average their gradients."""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="Apple Silicon.*--device cpu"):
        p5.setup_torchrun(p5.get_args([]), torch.device("mps"))
