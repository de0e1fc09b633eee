"""
What the phases share: picking a device, checking the command line, writing files safely, measuring the step, and
loading a dataset into memory: ONE uint8 tensor (N, C, H, W) plus int64 labels, kept on the training device, so a
batch is a random index into it (no DataLoader workers, no PIL in the loop). MNIST is 47 MB and CIFAR-10 150 MB.
"""
import argparse
import atexit
import hashlib
import math
import os
import re
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

def number(kind, low=0, low_ok=False, high=math.inf):
    """An argparse type: a finite `kind` (int or float) above `low` (or equal to it, with low_ok), below `high`."""
    def parse(text):
        value = kind(text)  # not a number: argparse says "invalid int value" / "invalid float value"
        if not math.isfinite(value) or value < low or (value == low and not low_ok) or value >= high:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number {'>=' if low_ok else '>'} {low}"
                                             + (f" and < {high}" if high < math.inf else ""))
        return value
    parse.__name__ = kind.__name__
    return parse


def npz_file(text):
    """argparse type of --save-npz: a file name, '.npz' added as numpy would add it (a folder is an error)."""
    name = text if text.endswith(".npz") else text + ".npz"
    if text.endswith(("/", os.sep)) or os.path.isdir(text) or os.path.isdir(name):
        raise argparse.ArgumentTypeError(f"{name!r} is a folder: name a file, e.g. {os.path.join(text, 'samples.npz')}")
    return name


def parse_args(parser, argv):
    """parser.parse_args; an @FILE (one argument a line) that is not UTF-8 text is a one-line error."""
    parser.convert_arg_line_to_args = lambda line: [line.lstrip("\ufeff")] if line.strip() else []  # BOM, blank
    try:
        args = parser.parse_args(argv)
    except UnicodeDecodeError:  # Python 3.11; 3.12+ reads the bad bytes as lone surrogates
        args = None
    if args is None or any(0xdc80 <= ord(c) <= 0xdcff for c in "".join(args.prompt or [])):
        parser.error("an @FILE is not UTF-8 text: save it as UTF-8 (one argument a line)")
    return args


LOCKS = {}  # --out-dir -> the open folder this process holds a lock on


def check_writable(out_dir, npz=None):
    """Check now, not after an hour of training, that --out-dir (and --save-npz's folder) can be written and that no
    other run uses --out-dir. Folders made here and still empty at exit are removed: a failed run leaves nothing."""
    for folder in [out_dir] + ([os.path.dirname(os.path.abspath(npz))] if npz else []):
        probe, top = os.path.join(folder, ".write-test"), os.path.abspath(folder)
        while not os.path.exists(os.path.dirname(top)):  # the outermost folder that is not there yet
            top = os.path.dirname(top)
        if not os.path.exists(top):
            atexit.register(remove_empty, top)
        try:
            os.makedirs(folder, exist_ok=True)
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            fail(f"cannot write to {folder!r} ({e.strerror}): choose another --out-dir / --save-npz")
    try:  # the system's lock on the folder lasts as long as this process, however it ends (POSIX; Windows: no lock)
        import fcntl
        key = os.path.realpath(out_dir)  # the folder is opened once per process; a later call takes the lock again
        fcntl.flock(LOCKS.get(key) or LOCKS.setdefault(key, os.open(key, os.O_RDONLY)), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"another run is using {out_dir!r} now: wait until it ends, or choose another --out-dir")
    except ImportError:
        pass


def remove_empty(root):
    """Remove the folders under root (and root) that hold no file."""
    for folder, _, _ in sorted(os.walk(root), reverse=True):
        if not os.listdir(folder):
            os.rmdir(folder)


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


def settle(args, config, defaults):
    """A checkpoint keeps its batch size and learning rate: a resume goes on with them unless the command line gives
    others, which are named. defaults: {flag's dest: the setting}, for a new run."""
    for k, default in defaults.items():
        value = config.get(k, default) if getattr(args, k) is None else getattr(args, k)
        if config.get(k, value) != value:
            print(f"note: --{k.replace('_', '-')} {value}, not the checkpoint's {config[k]}", file=sys.stderr)
        setattr(args, k, value)
        config[k] = value


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a cluster's preemption): training saves as on Ctrl-C, then the run stops at once."""
    def handler(signum, frame):  # signal.signal(signal.SIGTERM, Terminated.handler)
        raise Terminated


def random_state(device):
    """The CPU's random generator and the training device's (CUDA, MPS): a resume draws what one long run would."""
    return {"rng": torch.get_rng_state(), "device_rng": None if device.type == "cpu" else
            torch.get_device_module(device).get_rng_state(), "device_type": device.type}


def set_random_state(state, device):
    torch.set_rng_state(state["rng"])
    if state.get("device_type") == device.type != "cpu":  # saved on the same kind of device as this run trains on
        torch.get_device_module(device).set_rng_state(state["device_rng"])


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
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(n for n in have if have[n]) if name.lower() == "auto" else name.lower()
    if not have.get(name, True):
        fail(f"--device {name}: " + ("no CUDA GPU is visible to PyTorch" if name == "cuda" else
             "Apple's MPS backend is not available") + " here (use --device auto or --device cpu)")
    elif name not in have:
        fail(f"unknown --device {name!r}: choose auto, cpu, cuda or mps")
    if name == "cpu":  # PyTorch's fused CPU attention kernel trains ~2x slower than its plain-matmul version;
        torch.backends.cuda.enable_flash_sdp(False)  # despite the name, this flag also switches the CPU kernel
    return torch.device(name)


def use_compile(flag, default, device):
    """--compile / --no-compile, else the phase's COMPILE setting on CUDA only (a slower start, a faster step)."""
    if flag and device.type == "mps" and tuple(map(int, re.findall(r"\d+", torch.__version__)[:2])) < (2, 8):
        fail(f"--compile on Apple Silicon needs PyTorch 2.8 or newer (this is {torch.__version__}): drop --compile")
    return flag if flag is not None else default and device.type == "cuda"


def autocast(device, precision="auto"):
    """Mixed precision: matmuls and convs in bfloat16 where the hardware is fast at it; weights stay fp32. 'auto'
    means bf16 on CUDA GPUs that have it and on CPUs with native bf16 (AVX-512 BF16 / AMX), else fp32 (MPS too)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if device.type == "cpu":
            try:
                precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
            except (AttributeError, RuntimeError):
                pass
    print(f"device: {device.type}, {precision}", flush=True)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# Peak dense bf16 FLOP/s of common GPUs, from their data sheets: the denominator of the MFU.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "4090": 165e12}


def step_flops(batch_loss):
    """The FLOPs of one training step, forward and backward, as PyTorch counts them on one batch; the random numbers
    it draws are put back. Eagerly: before PyTorch 2.14, a compiled model first counted stayed eager."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.random.fork_rng([torch.cuda.current_device()] if torch.cuda.is_available() else []):
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            batch_loss().backward()
    return counter.get_total_flops()


def gpu_mfu(flops_per_second):
    """MFU, "model FLOPs utilisation": the share of the GPU's peak arithmetic the step uses (None off CUDA or for a GPU
    not in the table); the rest of the time it waits (memory, kernel launches, Python). Large transformers: 30-50%."""
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
            remove_empty(root)
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        fail(f"could not load {what} from {os.path.abspath(root)!r} ({why}). If it is not there and you are offline, "
             f"point --data-root at a folder that holds it; if it is there, a file may be damaged (delete it)")


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
        fail(f"{folder!r} is not a folder of images" if os.path.exists(folder) else f"{folder!r} does not exist")
    listed = {d.name: sorted(os.listdir(d.path)) for d in os.scandir(folder) if d.is_dir()}  # class -> its files
    files = [(c, os.path.join(folder, c, f)) for c in sorted(listed) for f in listed[c]
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    classes = sorted({c for c, _ in files})  # a class needs an image: an empty folder (or a link loop) is none
    skipped = [f"{c}/" for c in listed if c not in classes] + [  # hidden files (.DS_Store) are not worth a word
        f"{c}/{f}" for c in classes for f in listed[c] if not (f.lower().endswith(IMAGE_EXTENSIONS) or f[0] == ".")]
    if skipped:
        print(f"warning: skipped {len(skipped)} folder(s) or file(s) that are not class/<image>{IMAGE_EXTENSIONS}: "
              f"{', '.join(skipped[:5])}", file=sys.stderr, flush=True)
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


def decode_flowers102(root, image_size):
    """Oxford Flowers-102 through torchvision, all three splits pooled (8,189 images), square."""
    splits = download("Flowers-102", root, lambda: [torchvision.datasets.Flowers102(root, split=s, download=True)
                                                    for s in ("train", "val", "test")])  # needs scipy for .mat
    print(f"decoding {sum(len(ds) for ds in splits)} Flowers-102 images (once; cached in {cache_dir()})", flush=True)
    pairs = [ds[i] for ds in splits for i in range(len(ds))]                         # (PIL image, label)
    images, labels = np.stack([square_crop(im, image_size) for im, _ in pairs]), [y for _, y in pairs]
    return images, labels, [c.rstrip("?") for c in splits[0].classes]  # torchvision writes "pink-yellow dahlia?"


def load_dataset(name, root, train=True, image_size=32):
    """name: 'mnist', 'cifar10', 'flowers102', or a path to an image folder of your own. Decoded images are cached."""
    if name == "mnist":
        ds = download("MNIST", root, lambda: torchvision.datasets.MNIST(root, train=train, download=True))
        return ImageData(ds.data.unsqueeze(1).contiguous(), ds.targets.long(), [str(i) for i in range(10)])
    if name == "flowers102":
        key = hashlib.sha1(repr((os.path.abspath(root), image_size)).encode()).hexdigest()[:16]
        return cached(os.path.join(cache_dir(), f"flowers102-{image_size}px-{key}.pt"),
                      lambda: decode_flowers102(root, image_size))
    return load_cifar10(root, train) if name == "cifar10" else load_image_folder(name, image_size)
