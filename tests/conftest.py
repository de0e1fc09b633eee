"""Shared fixtures: tiny synthetic datasets in the real on-disk formats, so the real loaders are exercised offline."""
import functools
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Any download attempt fails at once (connection refused) instead of waiting on the network: tests are offline.
OFFLINE_ENV = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# torchrun's processes meet on the loopback interface: gloo's guess from the host name fails on some Macs.
TORCHRUN_ENV = {"GLOO_SOCKET_IFNAME": "lo0" if sys.platform == "darwin" else "lo", "OMP_NUM_THREADS": "1"}


@functools.cache
def cpp_compiler_with_openmp():
    """torch.compile on the CPU builds C++ with OpenMP: is there a compiler that can (Apple's clang cannot)?"""
    for cxx in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if cxx and shutil.which(cxx):
            program = "#include <omp.h>\nint main() { return omp_get_max_threads() < 1; }\n"
            return subprocess.run([cxx, "-fopenmp", "-x", "c++", "-", "-o", os.devnull], input=program,
                                  capture_output=True, text=True).returncode == 0
    return False


def synthetic_digits(n, seed=0):
    """n 28x28 uint8 images: a bright bar whose position encodes the label, plus noise; labels cycle 0..9."""
    g = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = (g.random((n, 28, 28)) * 40).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, 4:24, 2 + 2 * y: 4 + 2 * y] = 255
    return images, labels.astype(np.uint8)


def write_idx_mnist(root, n_train=64, n_test=20):
    """Write MNIST in its raw IDX format at <root>/MNIST/raw, where torchvision.datasets.MNIST looks for it."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = synthetic_digits(n, seed=n)
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return images, labels


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Decoded-folder caches go to a temp dir, never to the user's ~/.cache."""
    monkeypatch.setenv("FLOWMATCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist_data")
    write_idx_mnist(str(root))
    return str(root)


def run_script(script, *args, env=None, timeout=300):
    """Run a phase script as a user would; returns the CompletedProcess (stdout/stderr as text)."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_clean_error(result, *fragments):
    """Non-zero exit, a message on stderr, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def bytes_to_unicode():
    """GPT-2/CLIP's byte -> printable character table (the tokenizer's base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip(folder, hidden=32):
    """A tiny random CLIP text model with a tiny byte-level BPE tokenizer (vocab and merges written here)."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel
    os.makedirs(folder, exist_ok=True)
    chars = bytes_to_unicode()
    merges = ["p h", "o t", "ph ot", "phot o</w>", "d o", "c a"]
    tokens = chars + [c + "</w>" for c in chars] + ["ph", "ot", "phot", "photo</w>", "do", "ca"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = CLIPTextConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1, pad_token_id=len(tokens) - 1)
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))
