"""
The only code the phases share: picking a device and loading a dataset into memory.

A dataset becomes ONE uint8 tensor (N, C, H, W) plus int64 labels, kept on the training device.
A training batch is then a random index into that tensor: no DataLoader workers, no PIL in the loop.
MNIST is 47 MB and CIFAR-10 150 MB as uint8, so both fit on any GPU, MPS device or laptop RAM.
"""
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def fail(message):
    """Stop the script with a one-line error on stderr and exit code 1 (no traceback)."""
    raise SystemExit(f"error: {message}")


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
    return torch.device(name)


def autocast(device, precision="auto"):
    """Mixed precision: convs and matmuls run in bfloat16 where the hardware is fast at it; weights stay fp32.

    'auto' uses bf16 on CUDA GPUs that support it and on CPUs with native bf16 (AVX-512 BF16 / AMX: 2-3x faster
    training here), and fp32 on MPS and older CPUs, where bf16 would be slow or unsupported."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        elif device.type == "cpu":
            try:
                precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
            except (AttributeError, RuntimeError):
                precision = "fp32"
        else:
            precision = "fp32"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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


def missing_data(what, root, why):
    fail(f"could not load {what} from {os.path.abspath(root)!r} and could not download it ({why}).\n"
         f"  If you are offline, point --data-root at a folder that already holds it, e.g. --data-root ../shared/data")


def load_mnist(root, train=True):
    import torchvision
    try:  # reads <root>/MNIST/raw/*-ubyte when present; downloads otherwise
        ds = torchvision.datasets.MNIST(root, train=train, download=True)
    except Exception as e:  # noqa: BLE001 - offline, a bad mirror, a read-only root: all end the same way
        missing_data("MNIST", root, f"{type(e).__name__}: {e}".splitlines()[0])
    return ImageData(ds.data.unsqueeze(1).contiguous(), ds.targets.long(), [str(i) for i in range(10)])


def load_cifar10(root, train=True):
    """CIFAR-10: an image-folder copy at <root>/cifar10/{train,test}/<class>/ if there is one, else torchvision."""
    folder = os.path.join(root, "cifar10", "train" if train else "test")
    if os.path.isdir(folder):
        return load_image_folder(folder, image_size=32)
    import torchvision
    try:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=True)
    except Exception as e:  # noqa: BLE001
        missing_data("CIFAR-10", root, f"{type(e).__name__}: {e}".splitlines()[0])
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return ImageData(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes))


def cache_dir():
    """Where decoded image folders are cached: $FLOWMATCH_CACHE, else ~/.cache/flowmatch."""
    return os.environ.get("FLOWMATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowmatch")


def load_image_folder(folder, image_size):
    """An ImageFolder tree (one sub-folder per class), resized and centre-cropped to image_size, cached as .pt."""
    if not os.path.isdir(folder):
        fail(f"image folder {folder!r} does not exist")
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    files = [(c, os.path.join(folder, c, f)) for c in classes for f in sorted(os.listdir(os.path.join(folder, c)))
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        fail(f"no images found in {folder!r} (expected {folder}/<class name>/<image>.jpg)")
    # The cache key covers the folder, the size and every file's name and byte size, so edits invalidate it.
    key = hashlib.sha1(repr((os.path.abspath(folder), image_size,
                             [(p, os.path.getsize(p)) for _, p in files])).encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir(), f"{os.path.basename(os.path.normpath(folder))}-{image_size}px-{key}.pt")
    data = load_cache(cache)
    if data is not None:
        return data
    from PIL import Image
    label_of = {c: i for i, c in enumerate(classes)}
    print(f"decoding {len(files)} images from {folder} (once; cached in {cache_dir()})", flush=True)
    images = np.stack([square_crop(Image.open(path), image_size) for _, path in files])
    data = ImageData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                     torch.tensor([label_of[c] for c, _ in files], dtype=torch.long), classes)
    return save_cache(cache, data)


def square_crop(im, image_size):
    """A PIL image -> (image_size, image_size, 3) uint8: shorter side resized to image_size, then centre-cropped."""
    from PIL import Image
    with im:
        im = im.convert("RGB")
        if im.size != (image_size, image_size):
            scale = image_size / min(im.size)
            w, h = max(image_size, round(im.width * scale)), max(image_size, round(im.height * scale))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        return np.asarray(im)


def load_cache(path):
    try:
        d = torch.load(path)
        return ImageData(d["images"], d["labels"], d["classes"])
    except Exception:  # noqa: BLE001 - missing or broken: rebuilt, never fatal
        return None


def save_cache(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"images": data.images, "labels": data.labels, "classes": data.classes}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash mid-write never leaves a half cache behind
    return data


def load_flowers102(root, image_size=64):
    """Oxford Flowers-102 through torchvision, all three splits pooled (8,189 images), square, cached as .pt."""
    import torchvision
    key = hashlib.sha1(repr((os.path.abspath(root), image_size)).encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir(), f"flowers102-{image_size}px-{key}.pt")
    data = load_cache(cache)
    if data is not None:
        return data
    try:  # reads <root>/flowers-102/ when present; downloads otherwise (needs scipy for the .mat label files)
        splits = [torchvision.datasets.Flowers102(root, split=s, download=True) for s in ("train", "val", "test")]
    except Exception as e:  # noqa: BLE001
        missing_data("Flowers-102", root, f"{type(e).__name__}: {e}".splitlines()[0])
    n = sum(len(ds) for ds in splits)
    print(f"decoding {n} Flowers-102 images (once; cached in {cache_dir()})", flush=True)
    images, labels = [], []
    for ds in splits:
        for i in range(len(ds)):
            im, label = ds[i]
            images.append(square_crop(im, image_size))
            labels.append(label)
    classes = [c.rstrip("?") for c in splits[0].classes]  # torchvision writes "pink-yellow dahlia?"
    data = ImageData(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                     torch.tensor(labels, dtype=torch.long), classes)
    return save_cache(cache, data)


def load_dataset(name, root, train=True, image_size=32):
    """name: 'mnist', 'cifar10', 'flowers102', or a path to an image folder."""
    if name == "flowers102":
        return load_flowers102(root, image_size)
    if name == "mnist":
        return load_mnist(root, train)
    if name == "cifar10":
        return load_cifar10(root, train)
    return load_image_folder(name, image_size)
