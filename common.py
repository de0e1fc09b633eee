"""
What the phases share: picking a device, checking the command line, writing files safely, measuring the step, and
loading a dataset into memory.

A dataset becomes ONE uint8 tensor (N, C, H, W) plus int64 labels, kept on the training device.
A training batch is then a random index into that tensor: no DataLoader workers, no PIL in the loop.
MNIST is 47 MB and CIFAR-10 150 MB as uint8, so both fit on any GPU, MPS device or laptop RAM.
"""
import argparse
import hashlib
import math
import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torchvision

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def fail(message):
    """Stop the script with a one-line error on stderr and exit code 1 (no traceback)."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------------------
# Command line: numbers are checked when they are read, so a bad one stops the run before any work starts

def number(kind, low=0, low_ok=False):
    """An argparse type: a finite `kind` (int or float) above `low` (or equal to it, with low_ok)."""
    def parse(text):
        value = kind(text)  # not a number: argparse says "invalid int value" / "invalid float value"
        if not math.isfinite(value) or value < low or (value == low and not low_ok):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'>=' if low_ok else '>'} {low}")
        return value
    parse.__name__ = kind.__name__
    return parse


def npz_file(text):
    """argparse type of --save-npz: a file name, '.npz' added as numpy would add it (a folder is an error)."""
    if text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: name a file, e.g. {os.path.join(text, 'samples.npz')}")
    return text if text.endswith(".npz") else text + ".npz"


def check_writable(out_dir, npz=None):
    """Make sure --out-dir (and --save-npz's folder) can be written now, not after an hour of training. Folders made
    for the test are removed again: a run that stops before it writes anything leaves nothing behind."""
    for folder in [out_dir] + ([os.path.dirname(os.path.abspath(npz))] if npz else []):
        probe, top = os.path.join(folder, ".write-test"), os.path.abspath(folder)
        while not os.path.exists(os.path.dirname(top)):  # the outermost folder that is not there yet
            top = os.path.dirname(top)
        made = not os.path.exists(top)
        try:
            os.makedirs(folder, exist_ok=True)
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            fail(f"cannot write to {folder!r} ({e.strerror}): choose another --out-dir / --save-npz")
        finally:
            if made:
                shutil.rmtree(top, ignore_errors=True)


def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, then rename it over `path`: a crash, a kill or a full disk
    mid-write never leaves a half-written file, and the previous one stays until the new one is complete."""
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: two runs into the same folder never share it
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
        fail(f"could not write {path} ({' '.join(str(e).split())[:160]}); is the disk full? {kept}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_same_data(config, data, name, path):
    """A checkpoint remembers what it was trained on; going on with other data (another folder, other classes, a
    different number of images) would mix two datasets in one model, so it is refused."""
    seen = {"dataset": name, "classes": list(data.classes), "images": len(data.images)}
    if config.setdefault("data", seen) != seen:
        was = config["data"]
        fail(f"{path} was trained on {was['dataset']} ({was['images']} images, {len(was['classes'])} classes), not "
             f"{name} ({seen['images']} images, {len(seen['classes'])} classes): use that data, or another --out-dir")


def note_ignored(args, config, defaults):
    """A checkpoint rebuilds the model it trained: model-size flags given with other values are named, not dropped
    in silence. defaults: {flag's dest: its default}."""
    ignored = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k, default in defaults.items()
               if getattr(args, k) not in (default, config.get(k))]
    if ignored:
        print(f"note: {', '.join(ignored)} ignored: the checkpoint keeps its own "
              f"({', '.join(f'{k} {config.get(k)}' for k in defaults)})", file=sys.stderr, flush=True)


def finite(loss, step):
    """The smoothed loss as a number (None before the first step). NaN or infinity stops the run with one line
    before anything is saved: a diverged model never replaces a good checkpoint."""
    value = None if loss is None else loss.item()
    if value is not None and not math.isfinite(value):
        fail(f"the loss is {value} at step {step}: training diverged (a lower --lr may help); nothing of this run "
             f"since the last save was written, the checkpoint on disk is kept")
    return value


# ----------------------------------------------------------------------------------------------------------
# Device

def get_device(name="auto"):
    """'auto' picks cuda, then mps (Apple Silicon), then cpu; asking for one that is not there is an error."""
    name = name.lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible to PyTorch here (use --device auto or --device cpu)")
    elif name == "mps" and not has_mps:
        fail("--device mps: Apple's MPS backend is not available here (use --device auto or --device cpu)")
    elif name not in ("cpu", "cuda", "mps"):
        fail(f"unknown --device {name!r}: choose auto, cpu, cuda or mps")
    if name == "cpu":  # PyTorch's fused CPU attention kernel trains ~2x slower than its plain-matmul version;
        torch.backends.cuda.enable_flash_sdp(False)  # despite the name, this flag also switches the CPU kernel
    return torch.device(name)


def autocast(device, precision="auto"):
    """Mixed precision: matmuls and convs in bfloat16 where the hardware is fast at it; weights stay fp32.

    'auto' means bf16 on CUDA GPUs that support it and on CPUs with native bf16 (AVX-512 BF16 / AMX), and fp32 on
    MPS and older CPUs, where bf16 would be slow or unsupported."""
    if precision == "auto":
        precision = "fp32"
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            precision = "bf16"
        elif device.type == "cpu":
            try:
                precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
            except (AttributeError, RuntimeError):
                pass
    print(f"device: {device.type}, {precision}", flush=True)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# Peak dense bf16 FLOP/s of common GPUs, from their data sheets: the denominator of the MFU.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "4090": 165e12}


def step_flops(batch_loss):
    """The FLOPs of one training step, forward and backward, as PyTorch counts them on one batch. The random
    numbers that batch draws are put back, so training draws the same batches as it would have without this.
    Counted eagerly: before PyTorch 2.14, a compiled model first called under the counter was never compiled."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.random.fork_rng([torch.cuda.current_device()] if torch.cuda.is_available() else []):
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            batch_loss().backward()
    return counter.get_total_flops()


def gpu_mfu(flops_per_second):
    """MFU, "model FLOPs utilisation": the share of the GPU's peak arithmetic that the training step uses (None
    off CUDA, or for a GPU not in the table). The rest of the time the GPU waits: for memory, for kernel launches,
    for Python. Small models on a big GPU reach a few percent; large transformer runs reach 30-50%."""
    name = torch.cuda.get_device_name() if flops_per_second and torch.cuda.is_available() else ""
    peak = next((flops for gpu, flops in GPU_PEAK_BF16.items() if gpu in name), None)
    return flops_per_second / peak if peak else None


# ----------------------------------------------------------------------------------------------------------
# In-memory image datasets

@dataclass
class ImageData:
    images: torch.Tensor   # (N, C, H, W) uint8, 0..255
    labels: torch.Tensor   # (N,) int64
    classes: list          # class names, index = label

    def to(self, device):
        return ImageData(self.images.to(device), self.labels.to(device), self.classes)

    def random_batch(self, batch_size, flip=False):
        """A random batch as floats in [-1, 1] and its labels; `flip` mirrors half of it left-right."""
        idx = torch.randint(len(self.images), (batch_size,), device=self.images.device)
        x = self.images[idx].float() / 127.5 - 1.0
        if flip:
            mirror = torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5
            x = torch.where(mirror, x.flip(3), x)
        return x, self.labels[idx]


def download(what, root, make):
    """Run torchvision's loader `make()` (it reads local files, else downloads); failure is one clear line, and
    folders it left empty behind at a mistyped --data-root are removed."""
    existed = os.path.isdir(root)
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - offline, a bad mirror, a read-only root: all end the same way
        if not existed:
            for folder, _, _ in sorted(os.walk(root), reverse=True):
                if not os.listdir(folder):
                    os.rmdir(folder)
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        fail(f"could not load {what} from {os.path.abspath(root)!r} ({why}). If it is not there and you are offline, "
             f"point --data-root at a folder that holds it; if it is there, a file may be damaged (delete it)")


def load_mnist(root, train=True):
    ds = download("MNIST", root, lambda: torchvision.datasets.MNIST(root, train=train, download=True))
    return ImageData(ds.data.unsqueeze(1).contiguous(), ds.targets.long(), [str(i) for i in range(10)])


def load_cifar10(root, train=True):
    """CIFAR-10: an image-folder copy at <root>/cifar10/{train,test}/<class>/ if there is one, else torchvision."""
    folder = os.path.join(root, "cifar10", "train" if train else "test")
    if os.path.isdir(folder):
        return load_image_folder(folder, image_size=32)
    ds = download("CIFAR-10", root, lambda: torchvision.datasets.CIFAR10(root, train=train, download=True))
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return ImageData(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes))


def cache_dir():
    """Where decoded image folders are cached: $FLOWMATCH_CACHE, else ~/.cache/flowmatch."""
    return os.environ.get("FLOWMATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowmatch")


def load_image_folder(folder, image_size):
    """An ImageFolder tree (one sub-folder per class), resized and centre-cropped, cached as .pt. Files that are
    not readable images are skipped with one warning that names them."""
    if not os.path.isdir(folder):
        fail(f"image folder {folder!r} does not exist")
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    files = [(c, os.path.join(folder, c, f)) for c in classes for f in sorted(os.listdir(os.path.join(folder, c)))
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        fail(f"no images found in {folder!r} (expected {folder}/<class name>/<image>.jpg)")
    # The cache key covers the folder, the size and every file's name, byte size and time, so edits invalidate it.
    stamp = lambda p: (p, os.path.getsize(p), os.path.getmtime(p)) if os.path.exists(p) else (p,)  # noqa: E731
    key = hashlib.sha1(repr((os.path.abspath(folder), image_size, [stamp(p) for _, p in files])).encode()).hexdigest()
    cache = os.path.join(cache_dir(), f"{os.path.basename(os.path.normpath(folder))}-{image_size}px-{key[:16]}.pt")
    return cached(cache, lambda: decode_folder(folder, files, classes, image_size))


def decode_folder(folder, files, classes, image_size):
    from PIL import Image
    print(f"decoding {len(files)} images from {folder} (once; cached in {cache_dir()})", flush=True)
    images, labels, bad = [], [], []
    for c, path in files:
        try:
            images.append(square_crop(Image.open(path), image_size))
            labels.append(classes.index(c))
        except (OSError, Image.DecompressionBombError):  # not an image, truncated, a dangling link, too large
            bad.append(os.path.relpath(path, folder))
    if bad:
        print(f"warning: skipped {len(bad)} unreadable file(s): {', '.join(bad[:5])}", file=sys.stderr, flush=True)
    if not images:
        fail(f"none of the images in {folder!r} could be read")
    return np.stack(images), labels, classes


def square_crop(im, image_size):
    """A PIL image -> (image_size, image_size, 3) uint8: centre-cropped to a square, then resized."""
    from PIL import Image, ImageOps
    with im:
        return np.asarray(ImageOps.fit(im.convert("RGB"), (image_size, image_size), Image.BICUBIC))


def cached(path, build):
    """The ImageData that build() makes, saved at path (atomically) and read back from there next time."""
    try:
        d = torch.load(path, weights_only=True)
        return ImageData(d["images"], d["labels"], d["classes"])
    except Exception:  # noqa: BLE001 - missing or broken: rebuilt, never fatal
        pass
    try:  # checked before the decoding (minutes), not after it
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writable = os.access(os.path.dirname(path), os.W_OK)
    except OSError:
        writable = False
    if not writable:
        print(f"warning: cannot write the cache folder {cache_dir()!r}: the images are decoded again next time "
              f"(set FLOWMATCH_CACHE to a writable folder)", file=sys.stderr, flush=True)
    images, labels, classes = build()   # (N, H, W, 3) uint8 array, list of ints, list of names
    data = ImageData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels), classes)
    if writable:
        atomic_write(path, lambda f: torch.save({"images": data.images, "labels": data.labels, "classes": classes}, f))
    return data


def load_flowers102(root, image_size=64):
    """Oxford Flowers-102 through torchvision, all three splits pooled (8,189 images), square, cached as .pt."""
    key = hashlib.sha1(repr((os.path.abspath(root), image_size)).encode()).hexdigest()[:16]
    return cached(os.path.join(cache_dir(), f"flowers102-{image_size}px-{key}.pt"),
                  lambda: decode_flowers102(root, image_size))


def decode_flowers102(root, image_size):
    splits = download("Flowers-102", root, lambda: [torchvision.datasets.Flowers102(root, split=s, download=True)
                                                    for s in ("train", "val", "test")])  # needs scipy for .mat
    print(f"decoding {sum(len(ds) for ds in splits)} Flowers-102 images (once; cached in {cache_dir()})", flush=True)
    pairs = [ds[i] for ds in splits for i in range(len(ds))]                         # (PIL image, label)
    images, labels = np.stack([square_crop(im, image_size) for im, _ in pairs]), [y for _, y in pairs]
    return images, labels, [c.rstrip("?") for c in splits[0].classes]  # torchvision writes "pink-yellow dahlia?"


def load_dataset(name, root, train=True, image_size=32):
    """name: 'mnist', 'cifar10', 'flowers102', or a path to an image folder of your own."""
    if name in ("mnist", "cifar10"):
        return (load_mnist if name == "mnist" else load_cifar10)(root, train)
    return load_flowers102(root, image_size) if name == "flowers102" else load_image_folder(name, image_size)
