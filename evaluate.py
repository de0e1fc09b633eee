"""
Score the samples of phases 1-6, the way docs/RESULTS.md does:

    python phase3_cfg.py --num-samples 100 --save-npz out/phase3/samples.npz
    python evaluate.py out/phase3/samples.npz                  # add --json scores.json to keep the numbers

A classifier trained on real images (the first time: 2 minutes for MNIST, 16 for CIFAR-10 and 11 for Flowers-102
on 2 CPU cores with bf16, 1.6-1.8x that in fp32; then cached) looks at every sample. The image shape says which
dataset: 28x28 MNIST, 32x32x3 CIFAR-10, 64x64x3 Flowers-102 (phases 5-6's default data; that classifier learns
from the official test split, 6,149 photos, and is judged on train + val, 2,040, 20 a flower). Samples asked for
some classes only (phase 5's 8 flowers of 102) are compared with the real images of those classes:

  accuracy    fraction of the samples classified as the class they were asked to be (only when the npz has
              labels; phase 4's prompts count through the CIFAR class they name, the others are left out)
  confidence  mean top-class probability: does each sample look like *some* class?
  coverage    entropy of the predicted classes / log(classes): 1 = all equally often, 0 = always the same one
  FID         Frechet distance between Gaussians fitted to the classifier's features of the samples and of the
              real test set: quality and variety in one number, lower is better. It grows as N shrinks, so it is
              printed beside its floor: N real *training* images scored the same way, the best a model can do.
  precision   share of the samples that fall among real test images (Kynkaenniemi et al., 2019: inside the ball
              of some real image reaching its 3rd-nearest real neighbour, in the classifier's features): fidelity
  recall      share of real test images that fall among the samples (the same balls around the samples): variety
  spread      with labels, per class asked for: the samples' mean pairwise feature distance over that of the real
              test images of the class, averaged. 1.0 = as varied as real photos; low = the samples look alike

The features are this classifier's, not Inception's: compare these FIDs with each other at equal N, not with
published ones.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import ImageData, atomic_write, autocast, cache_dir, fail, get_device, load_dataset

DATASETS = {  # name: (shape of one image in the npz, the classifier's stage widths, training epochs, classes)
    "mnist": ((28, 28, 1), (32, 64, 128), 3, 10),
    "cifar10": ((32, 32, 3), (64, 128, 256), 10, 10),
    "flowers102": ((64, 64, 3), (32, 64, 128, 256), 30, 102),
}
FLOWERS_HELD_OUT = 2040     # Flowers-102's official train + val splits, which load_dataset pools first
BATCH_SIZE, LR = 256, 0.1   # SGD with Nesterov momentum, one cycle: linear warmup over 20%, then linear to 0
FLOOR_IMAGES = 10_000       # training images whose features are kept for the floor
MAX_SAMPLES = 100_000       # more would only cost memory and time: FID settles long before


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Score samples saved with --save-npz (phases 1-6).")
    p.add_argument("npz", help="a file written by a phase's --save-npz")
    p.add_argument("--dataset", choices=list(DATASETS), help="default: from the image shape")
    p.add_argument("--json", metavar="PATH", help="also write the scores to this file")
    p.add_argument("--data-root", default="data", help="where the real dataset is, or is downloaded to")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# The classifier: a small VGG-style CNN

def conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())


class Classifier(nn.Module):
    """A stem conv, then stages of (conv, 2x2 max-pool, conv) that each halve the image. A global max-pool gives
    the feature vector that FID compares (the last stage's width); a linear layer maps it to the classes."""

    def __init__(self, channels, widths, classes=10):
        super().__init__()
        layers, c = [conv_bn(channels, widths[0] // 2)], widths[0] // 2
        for w in widths:
            layers += [conv_bn(c, w), nn.MaxPool2d(2), conv_bn(w, w)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, classes)

    def forward(self, x):                      # x: (B, C, H, W) in [-1, 1]
        features = self.features(x)
        return self.head(features), features


def augment(x, flip, shift=2):
    """Random translations by up to `shift` pixels (each image its own), mirrors if `flip`, a little noise: the
    classifier must not call a slightly noisy or off-centre sample a different class."""
    b, _, h, w = x.shape
    padded = F.pad(x, [shift] * 4, mode="reflect")
    rows = torch.arange(h, device=x.device)[None, :, None] + torch.randint(2 * shift + 1, (b, 1, 1), device=x.device)
    cols = torch.arange(w, device=x.device)[None, None, :] + torch.randint(2 * shift + 1, (b, 1, 1), device=x.device)
    x = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    if flip:
        x = torch.where(torch.rand(b, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x + 0.1 * torch.rand(b, 1, 1, 1, device=x.device) * torch.randn_like(x)


def train_classifier(data, widths, epochs, device, amp, classes=10):
    torch.manual_seed(0)
    net = Classifier(data.images.shape[1], widths, classes).to(device)
    steps = max(1, epochs * len(data.images) // BATCH_SIZE)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps, pct_start=0.2, anneal_strategy="linear")
    flip = data.images.shape[1] == 3  # a mirrored plane is a plane; a mirrored 7 is not a digit
    t0 = time.time()
    for step in range(1, steps + 1):
        x, y = data.random_batch(BATCH_SIZE)
        with amp:
            loss = F.cross_entropy(net(augment(x, flip, max(2, x.shape[-1] // 16)))[0], y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            print(f"classifier step {step}/{steps} | loss {loss.item():.3f} | {(time.time() - t0) / 60:.1f} min",
                  flush=True)
    return net.eval()


@torch.no_grad()
def classify(net, images, device):
    """uint8 images (N, C, H, W) -> class probabilities (N, classes) and features (N, D), float64 on the CPU. In fp32
    on every machine, so the numbers do not depend on the precision a CPU happens to be fast at; float64 only on
    the CPU (Apple's MPS has none)."""
    probs, features = [], []
    for i in range(0, len(images), 500):
        logits, f = net(images[i:i + 500].to(device).float() / 127.5 - 1)
        probs.append(logits.float().softmax(1).cpu().double())
        features.append(f.float().cpu().double())
        if (i + 500) % 20_000 == 0:
            print(f"classified {i + 500} of {len(images)} images", flush=True)
    return torch.cat(probs), torch.cat(features)


def real_images(dataset, data_root):
    """The real images the classifier learns from, and the held-out ones it is judged on and samples are compared
    with. Phase 5 trains on all 8,189 flowers: its classifier learns from the official test split (the largest)."""
    if dataset != "flowers102":
        return load_dataset(dataset, data_root, train=True), load_dataset(dataset, data_root, train=False)
    pooled, n = load_dataset(dataset, data_root, image_size=64), FLOWERS_HELD_OUT
    return (ImageData(pooled.images[n:], pooled.labels[n:], pooled.classes),
            ImageData(pooled.images[:n], pooled.labels[:n], pooled.classes))


def get_classifier(dataset, data_root, device):
    """The cached classifier with its test accuracy, the test set's feature Gaussian and features (for recall and
    spread) and features of real training images (for the floor); trained and cached the first time."""
    (_, _, channels), widths, epochs, classes = DATASETS[dataset]
    path = os.path.join(cache_dir(), f"classifier-{dataset}-{'-'.join(map(str, widths))}x{epochs}.pt")
    net = Classifier(channels, widths, classes).to(device)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["net"])
    except Exception:  # noqa: BLE001 - missing or broken: trained again
        saved = None
    floor_ids = lambda n: torch.randperm(n, generator=torch.Generator().manual_seed(0))[:FLOOR_IMAGES]  # noqa: E731
    if saved is not None and "train_labels" not in saved:  # cached before the variety scores: the test set's
        train, test = real_images(dataset, data_root)        # features and the floor images' labels are added, once
        saved["test_features"], saved["test_labels"] = classify(net.eval(), test.images, device)[1].float(), test.labels
        saved["train_labels"] = train.labels[floor_ids(len(train.images))]
        atomic_write(path, lambda f: torch.save(saved, f))
    if saved is not None:
        return net.eval(), saved
    train, test = real_images(dataset, data_root)
    print(f"training a {dataset} classifier on {len(train.images)} real images (once; cached in {path})", flush=True)
    t0 = time.time()
    net = train_classifier(train.to(device), widths, epochs, device, autocast(device), classes)
    seconds = time.time() - t0
    probs, features = classify(net, test.images, device)
    floor = floor_ids(len(train.images))
    saved = {"net": net.state_dict(), "test_accuracy": (probs.argmax(1) == test.labels).double().mean().item(),
             "train_seconds": round(seconds, 1), "test_mean": features.mean(0), "test_cov": torch.cov(features.T),
             "test_features": features.float(), "test_labels": test.labels,
             "train_features": classify(net, train.images[floor], device)[1].float(),
             "train_labels": train.labels[floor]}
    atomic_write(path, lambda f: torch.save(saved, f))  # an interrupted run never leaves half a classifier behind
    return net, saved


# ----------------------------------------------------------------------------------------------------------
# The scores

def frechet_distance(mean_a, cov_a, mean_b, cov_b):
    """Distance between Gaussians: |mean_a - mean_b|^2 + Tr(cov_a + cov_b - 2 (cov_a cov_b)^1/2).

    Tr (cov_a cov_b)^1/2 is the sum of the square roots of the eigenvalues of cov_b^1/2 cov_a cov_b^1/2, which is
    symmetric, so eigvalsh computes it stably (the product cov_a cov_b itself is not symmetric)."""
    values, vectors = torch.linalg.eigh(cov_b)
    root_b = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_b @ cov_a @ root_b).clamp(min=0).sqrt().sum()
    return max(0.0, ((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item())


def fid(features, saved):
    return frechet_distance(features.mean(0), torch.cov(features.T), saved["test_mean"], saved["test_cov"])


def covered(points, centres, k=3):
    """For each point: is it inside the ball around some centre that reaches the centre's k-th nearest centre?"""
    radii = torch.cdist(centres, centres).kthvalue(k + 1, dim=1).values  # the 0th neighbour is the centre itself
    return torch.cat([(torch.cdist(p, centres) <= radii).any(1) for p in points.split(2000)])


def variety(features, labels, saved, k=3):
    """Precision, recall (against as many real test images as samples, both drawn at random with fixed seeds) and,
    with labels, the spread: the reference scorer's definitions, on this classifier's features."""
    real, real_labels = saved["test_features"], saved["test_labels"]
    n = min(len(features), len(real))
    if n <= k:
        return {}
    r = real[np.random.default_rng(0).permutation(len(real))[:n]].float()
    g = features[np.random.default_rng(1).permutation(len(features))[:n]].float()
    result = {"precision": covered(g, r, k).float().mean().item(), "recall": covered(r, g, k).float().mean().item()}
    mean_distance = lambda f: (torch.cdist(f, f).sum() / (len(f) * (len(f) - 1))).item()  # noqa: E731
    spreads = [mean_distance(features[labels == c].float()) / mean_distance(real[real_labels == c].float())
               for c in range(int(real_labels.max()) + 1)
               if labels is not None and (labels == c).sum() > 1 and (real_labels == c).sum() > 1]
    return {**result, **({"spread": float(np.mean(spreads))} if spreads else {})}


def compared_with(saved, labels, classes):
    """The real images that samples are compared with: all of them; or, when the samples were asked for some of the
    classes only (phase 5's 8 default flowers of 102), the real images of those classes, for FID, floor and recall."""
    asked = labels[labels >= 0].unique() if labels is not None else torch.arange(classes)
    if len(asked) in (0, classes) or "train_labels" not in saved:
        return saved
    test, train = torch.isin(saved["test_labels"], asked), torch.isin(saved["train_labels"], asked)
    features = saved["test_features"][test].double()
    return {**saved, "test_mean": features.mean(0), "test_cov": torch.cov(features.T), "test_labels": saved[
        "test_labels"][test], "test_features": features.float(), "train_features": saved["train_features"][train]}


def scores(probs, features, labels, saved):
    """All the numbers for one set of samples: probs (N, classes), features (N, D), labels (N,) or None."""
    saved, predicted = compared_with(saved, labels, probs.shape[1]), probs.argmax(1)
    share = torch.bincount(predicted).double() / len(predicted)
    share = share[share > 0]
    result = {"n": len(predicted), "confidence": probs.max(1).values.mean().item(), "fid": fid(features, saved),
              "coverage": abs((share * share.log()).sum().item()) / math.log(probs.shape[1]),
              "fid_floor": fid(saved["train_features"][:len(predicted)].double(), saved),
              "fid_floor_n": min(len(predicted), len(saved["train_features"]))}
    if labels is not None and (labels >= 0).any():
        asked = labels >= 0  # -1: a prompt that named no class
        result["accuracy"] = (predicted[asked] == labels[asked]).double().mean().item()
        result["n_labelled"] = int(asked.sum())
    return {**result, **(variety(features, labels, saved) if "test_features" in saved else {})}


def load_samples(path, dataset=None):
    """The npz's images as uint8 (N, C, H, W), its labels (or None), and the dataset they belong to."""
    try:
        with np.load(path) as npz:  # an .npz is a zip of .npy arrays; a lone .npy is one array, with no names
            if "images.npy" in npz.zip.namelist():  # how many, from its header: too many are refused unread
                with npz.zip.open("images.npy") as f:
                    version = np.lib.format.read_magic(f)
                    shape = getattr(np.lib.format, f"read_array_header_{version[0]}_0")(f)[0]
                if shape and shape[0] > MAX_SAMPLES:
                    fail(f"{path} holds {shape[0]:,} images; score at most {MAX_SAMPLES:,} (FID settles long before)")
            arrays = {key: npz[key] for key in npz.files}
        if not all(isinstance(array, np.ndarray) for array in arrays.values()):
            raise ValueError("it holds files that are not numpy arrays")
    except Exception as e:  # noqa: BLE001 - missing, truncated, not a zip, a zip of other files, a lone .npy
        fail(f"cannot read {path!r} as an .npz file of arrays ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
    if "images" not in arrays:
        fail(f"{path} has no 'images' array (it has: {', '.join(arrays) or 'nothing'}); write it with --save-npz")
    images, labels = arrays["images"], arrays.get("labels")
    shape = images.shape
    if images.ndim == 3:
        images = images[..., None]  # grey (N, H, W) -> (N, H, W, 1)
    matches = [name for name, (wanted, *_) in DATASETS.items() if images.shape[1:] == wanted]
    matches = matches if images.dtype == np.uint8 else []  # floats would need a guess at their range: refused
    if not matches or dataset not in (None, *matches) or len(images) < 2:
        fail(f"{path}: images of shape {shape} and dtype {images.dtype}; expected at least 2 uint8 images of "
             f"(28, 28) for mnist, (32, 32, 3) for cifar10 or (64, 64, 3) for flowers102"
             + (f" (--dataset {dataset})" if dataset else ""))
    dataset, classes = dataset or matches[0], DATASETS[dataset or matches[0]][3]
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (len(images),) or labels.min() < -1
                               or labels.max() >= classes):
        fail(f"{path}: 'labels' must be one integer class 0-{classes - 1} (or -1) per image (it holds {labels.dtype}, "
             f"shape {labels.shape})")
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            None if labels is None else torch.from_numpy(labels).long(), dataset)


def main(argv=None):
    args = get_args(argv)
    images, labels, dataset = load_samples(args.npz, args.dataset)
    device = get_device(args.device)
    net, saved = get_classifier(dataset, args.data_root, device)
    print(f"{dataset} classifier: {saved['test_accuracy']:.2%} on held-out real images "
          f"(trained in {saved['train_seconds'] / 60:.1f} min)", flush=True)
    result = {"npz": args.npz, "dataset": dataset, "classifier_test_accuracy": saved["test_accuracy"],
              **scores(*classify(net, images, device), labels, saved)}
    print(f"{result['n']} samples from {args.npz}")
    if "accuracy" in result:
        print(f"  accuracy    {result['accuracy']:.3f}  (of the {result['n_labelled']} asked for a class)")
    print(f"  confidence  {result['confidence']:.3f}\n  coverage    {result['coverage']:.3f}")
    print(f"  FID         {result['fid']:.2f}   (floor: {result['fid_floor']:.2f}, "
          f"{result['fid_floor_n']} real training images)")
    for key, what in (("precision", "real-looking"), ("recall", "variety: real images among the samples"),
                      ("spread", "variety within a class, 1.0 = as varied as real images")):
        if key in result:
            print(f"  {key:<11} {result[key]:.3f}  ({what})")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as e:
            fail(f"cannot write --json {args.json!r} ({e.strerror}); the classifier is cached, nothing is lost")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted (a classifier is cached only once it has finished training)")
