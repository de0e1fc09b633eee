"""
Phase 5 — latent flow matching: a VAE compresses 64x64 flower photos, the flow is learned in its latent space.

The idea. Take a noise image x0 ~ N(0, I) and a data image x1. Walk on the straight line between them:

    x_t = (1 - t) * x0 + t * x1,        t in [0, 1]      (t = 0 is pure noise, t = 1 is data)

Along that line the velocity is constant: dx_t/dt = x1 - x0. Train a network v(x_t, t) to predict it:

    loss = E_{x0, x1, t} || v(x_t, t) - (x1 - x0) ||^2

For one pair the target is exact; over all pairs that pass through the same x_t the network learns their
average, which is the velocity field that carries the whole noise distribution onto the data distribution.
To generate, start from noise at t = 0 and integrate dx/dt = v(x, t) to t = 1 (Euler: x += dt * v).

From phase 2, the network: the image is cut into patches (tokens), each patch becomes a vector,
a 2-D position code tells the tokens where they sit, and transformer blocks let every patch look at every other.
The time t steers each block through adaLN: it sets the scale and shift of every LayerNorm (Peebles & Xie, 2023).

From phase 3, guidance: the network learns v(x_t, t, c) and, with the condition dropped 10% of the time, the
unconditional v(x_t, t, null); sampling follows v = v_uncond + s * (v_cond - v_uncond) (Ho & Salimans, 2022).

From phase 4, text: a frozen CLIP text encoder turns a prompt into one vector per token; in every block the image
tokens read them through cross-attention; the empty prompt "" is the unconditional branch of CFG.

New in this phase: latents, the Stable Diffusion idea. A 64x64x3 image is 12,288 numbers, most of them
predictable from their neighbours. A small convolutional VAE learns to squeeze it into a 16x16x4 latent (1,024
numbers, 12x fewer) and back. The flow model then works on latents: noise -> latent -> decoder -> image.
Stage 1 trains the VAE (reconstruction + a small KL term that keeps the latent space smooth); every image is then
encoded once and cached; stage 2 trains the text-conditional DiT on the cached latents, scaled to unit variance.

With the real CLIP weights the prompts carry meaning. Offline, a CLIP with random weights (same architecture and
tokenizer) still gives each training caption its own embedding, so the model learns to tell them apart, but any
wording it never saw in training means nothing to it.

Run:
    python phase5_latent.py --prompt "a photo of a sunflower, a type of flower."   # trains both stages first
    python phase5_latent.py --stage vae --max-minutes 20     # only the VAE (resumable); then --stage flow
    python phase5_latent.py --max-minutes 60                 # both stages within 60 minutes, then sample
    python phase5_latent.py --data-root ../shared/data --clip-model ./clip-offline   # offline copies
"""
import argparse
import copy
import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from common import autocast, cache_dir, fail, get_device, load_dataset


# ----------------------------------------------------------------------------------------------------------
# Settings

CFG_SCALE = 7.0           # default guidance scale, as measured for phase 4
SWEEP_SCALES = [1, 2, 3, 5, 7]   # rows of cfg_sweep.png
TEMPLATES = ["a photo of a {}, a type of flower.", "a close-up photo of a {}, a type of flower.",
             "a photo of the {}, a type of flower.", "a blurry photo of a {}, a type of flower.",
             "a bright photo of a {}, a type of flower.", "a photo of a {}."]
DEFAULT_FLOWERS = ["sunflower", "rose", "daffodil", "water lily", "purple coneflower", "tiger lily", "hibiscus",
                   "bird of paradise"]
LATENT_CHANNELS, DOWNSAMPLE = 4, 4   # 64x64x3 -> 16x16x4
DEPTH, WIDTH = 6, 192
HOLDOUT = 300             # images kept out of training, to measure the VAE's reconstruction PSNR


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Phase 5: latent text-to-image flow matching on Flowers-102.")
    g = p.add_argument_group("stages and data")
    g.add_argument("--stage", choices=["vae", "flow", "all"], default="all",
                   help="vae: train the VAE; flow: train the DiT on latents; all: train what is missing, then sample")
    g.add_argument("--data", default="flowers102", help="'flowers102' or an image folder of your own (ImageFolder)")
    g.add_argument("--image-size", type=int, default=64, choices=[64, 128], help="training resolution")
    g.add_argument("--vae-share", type=float, default=0.3,
                   help="with --stage all and --max-minutes: the share of the time budget the VAE may use")
    g = p.add_argument_group("VAE")
    g.add_argument("--vae-steps", type=int, default=4000, help="VAE optimizer steps")
    g.add_argument("--vae-batch-size", type=int, default=32)
    g.add_argument("--vae-lr", type=float, default=1e-3)
    g.add_argument("--vae-width", type=int, default=32, help="channels at full resolution (x2 below)")
    g.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the KL term against the reconstruction")
    g = p.add_argument_group("training the flow")
    g.add_argument("--steps", type=int, default=4000, help="optimizer steps to train for")
    g.add_argument("--max-minutes", type=float, default=None, help="stop training after this much wall time")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-3,
                   help="peak AdamW learning rate, after warmup (phases 1-2 use 4e-3; this phase was measured at 1e-3)")
    g.add_argument("--warmup-steps", type=int, default=200, help="linear learning-rate warmup")
    g.add_argument("--cooldown", type=float, default=0.3,
                   help="fraction of the run (steps or minutes, whichever ends first) with the lr decaying to 0")
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights, used for sampling")
    g.add_argument("--t-sampling", choices=["uniform", "logit-normal"], default="logit-normal",
                   help="how training times t are drawn (logit-normal puts more weight on the middle)")
    g.add_argument("--t-mean", type=float, default=0.0,
                   help="centre of the logit-normal, in logits (phases 1-2 use -0.5; this phase was measured at 0)")
    g.add_argument("--caption-dropout", type=float, default=0.1,
                   help="probability of replacing a caption by the empty prompt (trains the unconditional model)")
    g = p.add_argument_group("model")
    g.add_argument("--patch-size", type=int, default=2, help="latent pixels per patch side (16x16 latent: 64 tokens)")
    g.add_argument("--depth", type=int, default=DEPTH, help="transformer blocks")
    g.add_argument("--width", type=int, default=WIDTH, help="token vector size")
    g.add_argument("--heads", type=int, default=4, help="attention heads (must divide --width)")
    g.add_argument("--pooled-text", action="store_true",
                   help="also add the pooled CLIP embedding to the adaLN conditioning vector")
    g.add_argument("--clip-model", default="openai/clip-vit-base-patch32",
                   help="Hugging Face name or local folder of a CLIP text model (frozen)")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help='a prompt (repeatable); default: eight flowers, "a photo of a {name}, a type of flower."')
    g.add_argument("--sample-only", action="store_true", help="skip training, sample from <out-dir>/ckpt.pt")
    g.add_argument("--cfg-scale", type=float, default=CFG_SCALE, help="guidance scale s (1 = no guidance)")
    g.add_argument("--num-samples", type=int, default=10, help="how many images per prompt")
    g.add_argument("--sample-steps", type=int, default=25,
                   help="Euler steps from noise to data (in the phase-4 benchmark 25 scored as well as 50)")
    g.add_argument("--save-npz", metavar="PATH", help="also save the samples as uint8 arrays for scoring")
    g = p.add_argument_group("I/O and system")
    g.add_argument("--data-root", default="data", help="where Flowers-102 is, or is downloaded to")
    g.add_argument("--compare-pixel-speed", action="store_true",
                   help="also time a training step of the same DiT on 64x64 pixels instead of latents")
    g.add_argument("--out-dir", default="out/phase5", help="samples, trajectory, checkpoint and metrics go here")
    g.add_argument("--resume", action="store_true", help="continue training from <out-dir>/ckpt.pt")
    g.add_argument("--ckpt-every", type=int, default=1000, help="also save a checkpoint every this many steps")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast where the hardware is fast at it (auto), or force one")
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "num_samples", "sample_steps", "patch_size", "depth", "width", "heads",
                 "ckpt_every", "vae_steps", "vae_batch_size", "vae_width"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.lr <= 0 or (args.max_minutes is not None and args.max_minutes <= 0) or not 0 <= args.ema_decay < 1:
        p.error("--lr and --max-minutes must be positive and --ema-decay in [0, 1)")
    if not 0 <= args.cooldown <= 1:
        p.error("--cooldown must be a fraction in [0, 1]")
    if (args.image_size // DOWNSAMPLE) % args.patch_size:
        p.error(f"--patch-size {args.patch_size} does not divide the {args.image_size // DOWNSAMPLE}-wide latent")
    if args.vae_width % 8 or args.vae_lr <= 0 or args.kl_weight < 0 or not 0 < args.vae_share < 1:
        p.error("--vae-width must be a multiple of 8, --vae-lr > 0, --kl-weight >= 0, --vae-share in (0, 1)")
    if args.width % args.heads or (args.width // args.heads) % 2:
        p.error("--width must be divisible by --heads, with an even size per head")
    if args.width % 4:
        p.error("--width must be a multiple of 4 (the 2-D position code splits it in four)")
    if args.cfg_scale < 0:
        p.error("--cfg-scale must be >= 0 (0 = unconditional, 1 = conditional, > 1 = guided)")
    if not 0 <= args.caption_dropout < 1:
        p.error("--caption-dropout must be in [0, 1)")
    if args.sample_only and args.resume:
        p.error("--sample-only and --resume cannot be used together")
    return args


# ----------------------------------------------------------------------------------------------------------
# VAE: pixels <-> latents (stage 1)

class VAEResBlock(nn.Module):
    """Two 3x3 convs with a residual path (no time input: the VAE only compresses)."""

    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                   nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.block(x)


class VAE(nn.Module):
    """64x64x3 -> 16x16x4 and back. Why 16x16x4 (4x smaller per side): 12x fewer numbers for the DiT, and a latent
    pixel still covers only 4x4 image pixels. At 8x8x4 (48x fewer; Stable Diffusion's 8x per side, but on 512px
    images) a whole flower would be a few latent pixels wide, and a small VAE would have to invent its detail."""

    def __init__(self, width=32, latent_channels=LATENT_CHANNELS):
        super().__init__()
        c1, c2 = width, 2 * width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),                                          # 64x64
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), VAEResBlock(c2),               # 32x32
            nn.Conv2d(c2, c2, 3, stride=2, padding=1), VAEResBlock(c2),               # 16x16
            nn.GroupNorm(8, c2), nn.SiLU(), nn.Conv2d(c2, 2 * latent_channels, 3, padding=1))  # mean, log-variance
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, c2, 3, padding=1), VAEResBlock(c2),            # 16x16
            nn.Upsample(scale_factor=2.0), nn.Conv2d(c2, c2, 3, padding=1), VAEResBlock(c2),   # 32x32
            nn.Upsample(scale_factor=2.0), nn.Conv2d(c2, c1, 3, padding=1),           # 64x64
            nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, 3, 3, padding=1))

    def encode(self, x):                                      # x: (B, 3, 64, 64) in [-1, 1]
        mean, logvar = self.encoder(x).chunk(2, dim=1)        # each (B, 4, 16, 16)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(z)                                # (B, 3, 64, 64)

    def forward(self, x):
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()   # reparameterised: z ~ N(mean, var), with grads
        return self.decode(z), mean, logvar


def kl_divergence(mean, logvar):
    """KL(N(mean, var) || N(0, I)) per latent number, averaged: 0.5 * (mean^2 + var - 1 - log var)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def vae_loss(vae, x, kl_weight):
    """Reconstruction (MSE) + a small KL weight: just enough to keep the latent space smooth and bounded."""
    recon, mean, logvar = vae(x)
    return F.mse_loss(recon, x) + kl_weight * kl_divergence(mean, logvar)


def psnr_db(vae, images, batch=100):
    """Reconstruction PSNR (dB) of uint8 images through the posterior means, pixels in [0, 1]."""
    errors = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].float() / 127.5 - 1
            recon = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
            errors.append(((recon - x) / 2).pow(2).flatten(1).mean(1))
    return float(-10 * torch.log10(torch.cat(errors).mean()))


def train_vae(args, vae, opt, step, data, deadline, amp):
    """Stage 1: train until --vae-steps or the deadline; resumable from vae.pt, saved atomically."""
    path = os.path.join(args.out_dir, "vae.pt")
    print(f"stage 1: training the VAE ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters) "
          f"from step {step} to {args.vae_steps}", flush=True)
    t_start, start_step, smooth = time.time(), step, None
    try:
        while step < args.vae_steps and time.time() < deadline:
            x, _ = data.random_batch(args.vae_batch_size, flip=True)
            with amp:
                loss = vae_loss(vae, x, args.kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
            if step % 25 == 0:
                show_progress(step, args.vae_steps, smooth, step - start_step, time.time() - t_start, deadline)
            if step % args.ckpt_every == 0:
                save_vae(path, vae, opt, step)
    except KeyboardInterrupt:
        print("\ninterrupted: saving the VAE", flush=True)
    print(flush=True)
    save_vae(path, vae, opt, step)
    return step, time.time() - t_start


def save_vae(path, vae, opt, step):
    state = {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step,
             "config": {"vae_width": vae.encoder[0].out_channels}}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic


class LatentData:
    """The training set as normalised latents, with ImageData's random_batch. Mirrored images are encoded too,
    so flips cost nothing in training."""

    def __init__(self, latents, labels, classes):
        self.latents, self.labels, self.classes = latents, labels, classes

    def random_batch(self, batch_size, flip=False):  # flips are already in the table
        idx = torch.randint(len(self.latents), (batch_size,), device=self.latents.device)
        return self.latents[idx], self.labels[idx]


@torch.no_grad()
def encode_dataset(vae, data, vae_step, cache_path, batch=250):
    """Encode every image (and its mirror) once; cached next to vae.pt and reused while the VAE is unchanged.

    Returns (LatentData, scale): latents are multiplied by scale = 1 / std(latents), so they have unit variance
    like the noise they are matched with (Stable Diffusion's 0.18215 is this number, for its VAE)."""
    try:
        cached = torch.load(cache_path, map_location=data.images.device)
        if cached["vae_step"] == vae_step and cached["n"] == len(data.images):
            print(f"latents: read from {cache_path}", flush=True)
            return LatentData(cached["latents"] * cached["scale"], cached["labels"], data.classes), cached["scale"]
    except Exception:  # noqa: BLE001 - no cache, or a stale or broken one: encode again
        pass
    print(f"latents: encoding {len(data.images)} images and their mirrors (once)", flush=True)
    means, labels = [], []
    for i in range(0, len(data.images), batch):
        x = data.images[i:i + batch].float() / 127.5 - 1
        means += [vae.encode(x)[0], vae.encode(x.flip(3))[0]]   # the posterior mean: deterministic latents
        labels += [data.labels[i:i + batch]] * 2
    latents, labels = torch.cat(means), torch.cat(labels)
    scale = float(1 / latents.std())
    torch.save({"vae_step": vae_step, "n": len(data.images), "latents": latents, "labels": labels, "scale": scale},
               cache_path + ".tmp")
    os.replace(cache_path + ".tmp", cache_path)
    return LatentData(latents * scale, labels, data.classes), scale


# ----------------------------------------------------------------------------------------------------------
# Model: a Diffusion Transformer (DiT) that predicts the velocity v(x_t, t)

### Patches and positions ###

def patchify(x, p):
    """(B, C, H, W) -> (B, N, p*p*C): cut the image into p x p patches, row by row, each flattened to a vector."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)      # (B, H/p, W/p, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, p, C, H, W):
    """(B, N, p*p*C) -> (B, C, H, W): the exact inverse of patchify."""
    B = tokens.shape[0]
    x = tokens.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
    return x.reshape(B, C, H, W)


def sincos_1d(dim, positions):
    """(N,) positions -> (N, dim): sin and cos at dim/2 geometric frequencies, as in the original Transformer."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * freqs[None]                         # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim, grid_h, grid_w):
    """(grid_h * grid_w, dim) fixed position code for patches in row-major order.

    Why 2-D: the patches form a grid, so a patch's row and column are both meaningful; numbering them 0..N-1 in
    one line would make the patch below a given one look 'far away'. Layout: the first dim/2 channels encode the
    row, the last dim/2 the column, each with the 1-D sin/cos code, so the code of (row + 1, col) differs from
    (row, col) only in the row half."""
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    code = torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)
    return code.float()


### Timestep embedding ###

class TimeEmbedding(nn.Module):
    """t in [0, 1] -> a vector. Sinusoids with periods from 1 down to 1/1000 of the unit interval, then an MLP."""

    def __init__(self, dim, freq_dim=64, max_freq=1000.0):
        super().__init__()
        # Frequencies 1 ... max_freq, geometrically spaced. A sinusoid meant for integer steps (periods up to
        # 10,000) would barely move while t goes from 0 to 1; these make every t give a distinct embedding.
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(max_freq), freq_dim // 2)))
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):                                                  # t: (B,)
        angles = t[:, None] * self.freqs[None] * math.pi                   # (B, freq_dim/2)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))    # (B, dim)


### Text encoder: frozen CLIP ###

class CLIPTextEncoder:
    """Prompts -> CLIP token embeddings (B, 77, D) and attention mask (B, 77). Frozen: never trained, no grads.

    Embeddings are cached per caption, in memory and on disk (keyed by model + caption), so a fixed caption set is
    encoded once, ever: training looks captions up in a table instead of running CLIP on every batch."""

    def __init__(self, name, device):
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # our own progress line is enough
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(name)
            self.model = CLIPTextModel.from_pretrained(name).to(device).eval().requires_grad_(False)
        except Exception as e:  # noqa: BLE001 - not found, offline, not a CLIP folder: all end the same way
            fail(f"could not load CLIP {name!r} ({str(e).splitlines()[0][:120]}). Offline, pass --clip-model DIR "
                 f"with a saved CLIP text model (e.g. one written by shared/tools/make_offline_clip.py)")
        self.device, self.dim = device, self.model.config.hidden_size
        self.max_tokens = self.model.config.max_position_embeddings  # 77 for every CLIP
        self.memory = {}
        # The disk cache key names the model; for a local folder also its weights' size and time, so new weights
        # in the same folder are never mixed up with old embeddings.
        stamp = name
        if os.path.isdir(name):
            stamp = repr([(f, os.path.getsize(os.path.join(name, f)), os.path.getmtime(os.path.join(name, f)))
                          for f in sorted(os.listdir(name))]) + os.path.abspath(name)
        self.disk_dir = os.path.join(cache_dir(), "clip", hashlib.sha1(stamp.encode()).hexdigest()[:16])

    def count_tokens(self, prompt):
        return len(self.tokenizer(prompt)["input_ids"])  # includes the begin and end tokens

    @torch.no_grad()
    def _run_clip(self, prompts):
        # Run CLIP only as far as the longest prompt, then pad to 77 with zeros: exact, since CLIP's attention is
        # causal (no token sees the padding after it), and 5-10x less work than 77 tokens for short captions.
        tokens = self.tokenizer(prompts, padding="longest", max_length=self.max_tokens, truncation=True,
                                return_tensors="pt").to(self.device)
        out = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        pad = self.max_tokens - out.shape[1]
        emb = F.pad(out.float(), (0, 0, 0, pad))                                  # (B, 77, D)
        mask = F.pad(tokens.attention_mask.bool(), (0, pad))                      # (B, 77), False = padding
        return emb * mask[..., None], mask

    def _disk_path(self, prompt):
        return os.path.join(self.disk_dir, hashlib.sha1(prompt.encode()).hexdigest() + ".pt")

    def encode(self, prompts):
        """list of B prompts -> embeddings (B, 77, D) float32 and mask (B, 77) bool (True = a real token)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.memory]
        for p in list(missing):
            try:
                self.memory[p] = torch.load(self._disk_path(p), map_location=self.device)
                missing.remove(p)
            except Exception:  # noqa: BLE001 - not cached yet (or a broken file): compute it
                pass
        if missing:
            os.makedirs(self.disk_dir, exist_ok=True)
            for i in range(0, len(missing), 64):
                emb, mask = self._run_clip(missing[i:i + 64])
                for p, e, m in zip(missing[i:i + 64], emb, mask):
                    self.memory[p] = (e, m)
                    tmp = self._disk_path(p) + ".tmp"
                    torch.save((e.cpu(), m.cpu()), tmp)
                    os.replace(tmp, self._disk_path(p))
        emb = torch.stack([self.memory[p][0] for p in prompts])
        mask = torch.stack([self.memory[p][1] for p in prompts])
        return emb, mask


def trim_padding(text, mask):
    """Cut the token axis to the longest prompt in the batch. Exact: padded positions are masked out anyway,
    and it makes cross-attention ~5x cheaper (captions here are ~10 of CLIP's 77 tokens)."""
    n = int(mask.sum(1).max())
    return text[:, :n], mask[:, :n]


### Core model ###

def modulate(x, shift, scale):
    """adaLN: the conditioning vector sets the shift and scale that LayerNorm would otherwise learn as constants."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Every token looks at every other token (multi-head, through PyTorch's fused attention kernel)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):                                                        # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, D/h)
        out = F.scaled_dot_product_attention(q, k, v)                            # softmax(q k^T / sqrt(D/h)) v
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """LayerNorm (no learned affine) -> adaLN modulate -> attention -> gate; the same around an MLP."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # Exact GELU: the tanh approximation (DiT's choice) is 3x slower on CPU, forward and backward.
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # c -> shift, scale, gate for both halves

    def forward(self, x, c):                                    # x: (B, N, D) tokens, c: (B, D) conditioning
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class CrossAttention(nn.Module):
    """Image tokens (queries) read the text tokens (keys and values); padding tokens are masked out."""

    def __init__(self, dim, text_dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(text_dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, text, mask):                        # x: (B, N, D), text: (B, L, Dt), mask: (B, L)
        B, N, D = x.shape
        q = self.q(x).reshape(B, N, self.heads, D // self.heads).transpose(1, 2)                    # (B, h, N, D/h)
        k, v = self.kv(text).reshape(B, -1, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, D/h)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # True = may attend
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class TextConditionedDiTBlock(DiTBlock):
    """The DiT block with cross-attention to the text between self-attention and the MLP."""

    def __init__(self, dim, text_dim, heads, mlp_ratio=4):
        super().__init__(dim, heads, mlp_ratio)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, text_dim, heads)

    def forward(self, x, c, text, mask):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross(self.norm_cross(x), text, mask)   # what does the prompt say about this patch?
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token back to its patch of velocity values."""

    def __init__(self, dim, patch_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class TextConditionalDiT(nn.Module):
    """patchify -> embed + 2-D positions -> blocks (adaLN from t, cross-attention to the text) -> unpatchify."""

    def __init__(self, image_shape=(3, 32, 32), patch_size=4, depth=6, width=192, heads=6, text_dim=512,
                 pooled_text=False):
        super().__init__()
        self.image_shape, self.patch_size = tuple(image_shape), patch_size
        C, H, W = self.image_shape
        patch_dim = patch_size * patch_size * C
        self.patch_embed = nn.Linear(patch_dim, width)
        self.register_buffer("pos_embed", sincos_2d(width, H // patch_size, W // patch_size))  # (N, D), fixed
        self.time_embed = TimeEmbedding(width)
        self.pooled_embed = nn.Linear(text_dim, width) if pooled_text else None
        self.blocks = nn.ModuleList([TextConditionedDiTBlock(width, text_dim, heads) for _ in range(depth)])
        self.final = FinalLayer(width, patch_dim)
        self.initialize_weights()

    def initialize_weights(self):
        # Plain Xavier for every linear layer, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # adaLN-Zero: the modulation layers start at zero, so every gate is 0 and every block is exactly the
        # identity at step 0. A deep stack then starts as a shallow, well-behaved network and each block learns
        # how much to contribute; DiT found this trains faster and more stably than any other conditioning.
        # Cross-attention's output projection starts at zero as well (as in PixArt), so each whole block is.
        for block in self.blocks:
            for layer in (block.adaLN[-1], block.cross.proj):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        # The output layer starts at zero too: the model first predicts v = 0, a calm start for the loss.
        for layer in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, text, mask):       # x: (B, C, H, W), t: (B,), text: (B, L, Dt), mask: (B, L)
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed   # (B, N, D)
        c = self.time_embed(t)                                        # (B, D): "how noisy"
        if self.pooled_embed is not None:  # CLIP's summary of the prompt: the embedding of its end token
            c = c + self.pooled_embed(text[torch.arange(len(text)), mask.sum(1) - 1])
        for block in self.blocks:
            tokens = block(tokens, c, text, mask)                     # (B, N, D)
        patches = self.final(tokens, c)                               # (B, N, p*p*C)
        return unpatchify(patches, self.patch_size, *self.image_shape)  # velocity, like x


def build_model(config):
    return TextConditionalDiT(config["image_shape"], config["patch_size"], config["depth"], config["width"],
                              config["heads"], config["text_dim"], config["pooled_text"])


# ----------------------------------------------------------------------------------------------------------
# Flow matching: the loss and the sampler (the whole algorithm)

def sample_t(batch_size, how, device, mean=0.0):
    """Training times. logit-normal = sigmoid(N(mean, 1)): dense around sigmoid(mean), away from the easy ends.
    mean < 0 moves the weight towards the noise end (t=0), where the layout of the image is decided.
    Measured on phase 1 (1,000 steps, 1,000 samples): classifier-FID 4.6 with logit-normal, 6.1 with uniform."""
    if how == "uniform":
        return torch.rand(batch_size, device=device)
    return torch.sigmoid(mean + torch.randn(batch_size, device=device))


def interpolate(x0, x1, t):
    """The straight path from noise x0 (t=0) to data x1 (t=1): x_t = (1 - t) x0 + t x1, and its velocity."""
    t = t.view(-1, *[1] * (x0.dim() - 1))                      # (B,) -> (B, 1, 1, 1) to broadcast over pixels
    return (1 - t) * x0 + t * x1, x1 - x0


def text_conditional_loss(model, x1, text, mask, t_sampling="logit-normal", t_mean=0.0):
    """Flow-matching loss for v(x_t, t, text). Caption dropout happens where captions are chosen (the trainer):
    a dropped caption is the empty prompt, so the same network also learns the unconditional v(x_t, t, "")."""
    x0 = torch.randn_like(x1)                                  # noise
    t = sample_t(len(x1), t_sampling, x1.device, t_mean)
    xt, target = interpolate(x0, x1, t)
    return F.mse_loss(model(xt, t, text, mask), target)


@torch.no_grad()
def euler_sample(velocity, noise, steps, keep_every=None):
    """Integrate dx/dt = velocity(x, t) from t=0 (noise) to t=1 (data) in equal Euler steps.

    Returns the final x and, if keep_every is given, the list of x_t every keep_every steps (for pictures)."""
    x, dt = noise, 1.0 / steps
    trajectory = [x]
    for i in range(steps):
        t = torch.full((len(x),), i * dt, device=x.device)
        x = x + dt * velocity(x, t)
        if keep_every and (i + 1) % keep_every == 0:
            trajectory.append(x)
    return x, trajectory


def guided_velocity(model, x, t, cond, uncond, cfg_scale):
    """v_uncond + s * (v_cond - v_uncond), both predictions from ONE forward pass over a doubled batch.

    cond, uncond: (text, mask) pairs of the same token length."""
    if cfg_scale == 1:
        return model(x, t, *cond)      # s = 1 is the conditional prediction: skip the unconditional half
    if cfg_scale == 0:
        return model(x, t, *uncond)    # s = 0 is the unconditional prediction
    text, mask = torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]])
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), text, mask).chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def sample_text_conditional(model, encoder, prompts, cfg_scale, steps, noise=None, keep_every=None):
    """Euler sampling of one image per prompt in `prompts`, guided with scale cfg_scale against the empty prompt."""
    emb, mask = trim_padding(*encoder.encode(list(prompts) + [""]))   # one token length for both halves
    cond = emb[:-1], mask[:-1]
    uncond = emb[-1:].expand_as(cond[0]), mask[-1:].expand_as(cond[1])
    if noise is None:
        noise = torch.randn(len(prompts), *model.image_shape, device=emb.device)
    return euler_sample(lambda x, t: guided_velocity(model, x, t, cond, uncond, cfg_scale), noise, steps, keep_every)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one file with everything needed to resume or to sample

def save_checkpoint(path, model, ema, opt, step, config, smooth_loss):
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
             "config": config, "smooth_loss": smooth_loss, "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a broken ckpt.pt


def load_checkpoint(path, device):
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}: train first (without --sample-only/--resume) or point --out-dir at a run")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        state["config"], state["step"]  # noqa: B018 - check the keys exist
    except Exception as e:  # noqa: BLE001
        fail(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it or train again with a new --out-dir")
    return state


# ----------------------------------------------------------------------------------------------------------
# Training loop

def run_progress(args, step, seconds):
    """How far the run is, from 0 to 1: in steps or in minutes, whichever runs out first."""
    progress = step / args.steps
    if args.max_minutes:
        progress = max(progress, seconds / (60 * args.max_minutes))
    return progress


def learning_rate(args, step, seconds):
    """Linear warmup, constant, then a linear cooldown to 0 over the last --cooldown of the run (by run_progress,
    so a time-limited run also ends with a low learning rate)."""
    progress = run_progress(args, step, seconds)
    return args.lr * min(1.0, (step + 1) / args.warmup_steps, max(1.0 - progress, 0.0) / max(args.cooldown, 1e-9))


class TextConditionalTrainer:
    """The training loop, with captions: each image gets a random template of its class, or (caption dropout)
    the empty prompt. All caption embeddings are computed once, up front, into one table on the device."""

    def __init__(self, args, model, ema, opt, encoder, data):
        self.args, self.model, self.ema, self.opt, self.data = args, model, ema, opt, data
        self.captions = [tpl.format(name) for name in data.classes for tpl in TEMPLATES] + [""]  # "" is last
        self.text, self.mask = trim_padding(*encoder.encode(self.captions))  # (K, L, Dt), (K, L): K captions
        self.empty = len(self.captions) - 1

    def caption_ids(self, labels):
        """labels (B,) -> caption indices (B,): a random template of each class, or the empty prompt."""
        template = torch.randint(len(TEMPLATES), labels.shape, device=labels.device)
        ids = labels * len(TEMPLATES) + template
        drop = torch.rand(labels.shape, device=labels.device) < self.args.caption_dropout
        return torch.where(drop, torch.full_like(ids, self.empty), ids)

    def train(self, config, device, amp, step):
        """Train until --steps or --max-minutes; checkpoints periodically, at the end, and on Ctrl-C."""
        args, model, ema, opt = self.args, self.model, self.ema, self.opt
        ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"training {n_params / 1e6:.2f}M parameters on {device} from step {step} to {args.steps}", flush=True)
        deadline = time.time() + 60 * args.max_minutes if args.max_minutes else float("inf")
        t_start, start_step, smooth_loss = time.time(), step, None
        try:
            while step < args.steps and time.time() < deadline:
                lr = learning_rate(args, step, time.time() - t_start)
                for group in opt.param_groups:
                    group["lr"] = lr
                x1, y = self.data.random_batch(args.batch_size, flip=True)  # mirrored photos are photos too
                ids = self.caption_ids(y)
                with amp:  # forward pass in bf16 where it is fast (see common.autocast); the loss in fp32
                    loss = text_conditional_loss(model, x1, self.text[ids], self.mask[ids],
                                                 args.t_sampling, args.t_mean)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # one bad batch cannot wreck the weights
                opt.step()
                # EMA of the weights: a running average that samples better than the noisy latest weights.
                # The decay ramps up from 0 so that early EMA weights are not stuck near the random init.
                decay = min(args.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1 - decay)
                step += 1
                smooth_loss = loss.item() if smooth_loss is None else 0.98 * smooth_loss + 0.02 * loss.item()
                if step % 25 == 0 or step == args.steps:
                    show_progress(step, args.steps, smooth_loss, step - start_step, time.time() - t_start, deadline)
                if step % args.ckpt_every == 0:
                    save_checkpoint(ckpt_path, model, ema, opt, step, config, smooth_loss)
        except KeyboardInterrupt:
            print("\ninterrupted: saving a checkpoint, then sampling", flush=True)
        print(flush=True)
        save_checkpoint(ckpt_path, model, ema, opt, step, config, smooth_loss)
        seconds = time.time() - t_start
        return {"steps": step, "steps_this_run": step - start_step, "train_seconds": round(seconds, 1),
                "train_images_per_s": round((step - start_step) * args.batch_size / max(seconds, 1e-9), 1),
                "params": n_params, "final_smooth_loss": smooth_loss}


def show_progress(step, total, loss, steps_done, seconds, deadline):
    rate = steps_done / max(seconds, 1e-9)
    eta = min((total - step) / max(rate, 1e-9), max(deadline - time.time(), 0))
    line = f"step {step}/{total} | loss {loss:.4f} | {rate:.1f} it/s | ETA {int(eta // 60)}m{int(eta % 60):02d}s"
    # One updating line in a terminal; one line per update in a log file.
    print(("\r" + line) if sys.stdout.isatty() else line, end="" if sys.stdout.isatty() else "\n", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Outputs: a row per prompt, trajectory strip, CFG sweep, arrays for scoring

def to_uint8(x):
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, H, W) for grey or (N, H, W, 3) for RGB."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


@torch.no_grad()
def sample_each_prompt(model, encoder, prompts, per_prompt, cfg_scale, steps, generator=None, batch=500):
    """per_prompt images of each prompt, prompt-major (grid rows = prompts); images (P * per_prompt, C, H, W)."""
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(per_prompt)]
    noise = torch.randn(len(repeated), *model.image_shape, generator=generator).to(device)
    images = [sample_text_conditional(model, encoder, repeated[i:i + batch], cfg_scale, steps, noise[i:i + batch])[0]
              for i in range(0, len(repeated), batch)]  # in chunks, so 1,000 samples fit in a laptop's memory
    return torch.cat(images)


def save_grid(images, path, nrow, captions=None):
    """Save a grid of [-1, 1] images; with captions, a white strip on the left gives each row's text."""
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    picture = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    if captions:
        row_h, strip_w = (grid.shape[1] - 1) // len(captions), 8 + 6 * max(len(c) for c in captions)
        canvas = Image.new("RGB", (strip_w + picture.width, picture.height), "white")
        canvas.paste(picture, (strip_w, 0))
        draw = ImageDraw.Draw(canvas)
        for i, caption in enumerate(captions):
            draw.text((4, i * row_h + row_h // 2 - 5), caption, fill="black")
        picture = canvas
    picture.save(path)


def class_of_prompt(prompt, classes):
    """The class a prompt names (the longest match: "lily" vs "water lily"), or -1 if it names none."""
    named = [(len(name), i) for i, name in enumerate(classes) if re.search(rf"\b{re.escape(name)}s?\b", prompt.lower())]
    return max(named)[1] if named else -1


@torch.no_grad()
def decode(vae, latents, scale, batch=250):
    """Normalised latents -> images in [-1, 1]: undo the scale, then the VAE decoder."""
    return torch.cat([vae.decode(latents[i:i + batch] / scale) for i in range(0, len(latents), batch)])


def save_vae_pictures(args, vae, holdout):
    """recon.png: held-out originals (top row) over their reconstructions; latents.png: each image, then its 4
    latent channels as grey pictures (upsampled), so readers see what the DiT works on."""
    x = holdout[:8].float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(x)[0]
        recon = vae.decode(mean)
    save_grid(torch.cat([x, recon]).cpu(), os.path.join(args.out_dir, "recon.png"), nrow=len(x))
    channels = mean[:4] / mean.abs().amax(dim=(0, 2, 3), keepdim=True)        # each channel scaled to [-1, 1]
    channels = F.interpolate(channels, size=x.shape[-1], mode="nearest")      # (4, 4, 64, 64)
    rows = [torch.cat([x[i:i + 1], channels[i][:, None].expand(-1, 3, -1, -1)]) for i in range(len(channels))]
    save_grid(torch.cat(rows).cpu(), os.path.join(args.out_dir, "latents.png"), nrow=1 + channels.shape[1])


def generate(args, model, encoder, vae, scale, device, amp):
    """Sample --num-samples per prompt; write samples.png, trajectory.png, cfg_sweep.png and (optionally) the npz."""
    gen = torch.Generator().manual_seed(args.seed)  # noise drawn on the CPU: the same images on every device
    t0 = time.time()
    with amp:  # x stays fp32: x + dt * v promotes the bf16 velocity
        latents = sample_each_prompt(model, encoder, args.prompt, args.num_samples, args.cfg_scale,
                                     args.sample_steps, gen)
        images = decode(vae, latents, scale).float()
    seconds = time.time() - t0
    images = images.cpu()
    image_shape = images.shape[1:]                     # (3, 64, 64): decoded pictures, not latents
    cols = min(args.num_samples, 10)   # grid: one row per prompt, up to 10 samples each
    save_grid(images.view(len(args.prompt), args.num_samples, *image_shape)[:, :cols].flatten(0, 1),
              os.path.join(args.out_dir, "samples.png"), nrow=cols, captions=args.prompt)

    # Two pictures from one noise per prompt: how noise becomes a picture, and what the guidance scale does.
    noise = torch.randn(len(args.prompt), *model.image_shape, generator=gen).to(device)
    with amp:
        _, traj = sample_text_conditional(model, encoder, args.prompt, args.cfg_scale, args.sample_steps, noise,
                                          keep_every=max(1, args.sample_steps // 8))
        sweep = [decode(vae, sample_text_conditional(model, encoder, args.prompt, s, args.sample_steps, noise)[0],
                        scale).float() for s in SWEEP_SCALES]
        traj = [decode(vae, xt, scale).float() for xt in traj]   # decoded x_t: the picture the latent would give
    strip = torch.stack([xt.cpu() for xt in traj], dim=1).flatten(0, 1)  # rows = prompts, columns = t from 0 to 1
    save_grid(strip, os.path.join(args.out_dir, "trajectory.png"), nrow=len(traj), captions=args.prompt)
    save_grid(torch.cat(sweep).cpu(), os.path.join(args.out_dir, "cfg_sweep.png"), nrow=len(args.prompt),
              captions=[f"cfg scale {s}" for s in SWEEP_SCALES])

    if args.save_npz:
        labels = np.repeat([class_of_prompt(p, args.classes) for p in args.prompt], args.num_samples)
        os.makedirs(os.path.dirname(os.path.abspath(args.save_npz)), exist_ok=True)
        np.savez_compressed(args.save_npz, images=to_uint8(images), labels=labels)
    print(f"sampled {len(images)} images in {seconds:.1f}s ({args.sample_steps} Euler steps, CFG scale "
          f"{args.cfg_scale}) -> {args.out_dir}" + (f" and {args.save_npz}" if args.save_npz else ""), flush=True)
    return {"num_samples": len(images), "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale,
            "sample_seconds": round(seconds, 1)}


# ----------------------------------------------------------------------------------------------------------
# Main

def check_prompts(prompts, encoder):
    """Refuse (rather than silently truncate) empty prompts and prompts longer than CLIP's 77 tokens."""
    for p in prompts:
        if not p.strip():
            fail("empty prompt: say what to draw, e.g. --prompt \"a photo of a dog\"")
        n = encoder.count_tokens(p)
        if n > encoder.max_tokens:
            fail(f"prompt is {n} tokens, CLIP reads at most {encoder.max_tokens} (begin and end included): "
                 f"shorten it: {p[:60]!r}...")


def split_holdout(data):
    """A fixed held-out set (same images for every seed and run) for the VAE's PSNR; the rest trains both stages."""
    order = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(1234)).to(data.images.device)
    n = min(HOLDOUT, len(order) // 10)
    train = type(data)(data.images[order[n:]], data.labels[order[n:]], data.classes)
    return train, data.images[order[:n]]


def pixel_vs_latent_step(model, config, encoder, device, amp, image_size, batch_size=16, repeats=3):
    """Seconds per training step of this DiT on latents vs the same DiT (width, depth, patch) on pixels."""
    pixel_config = dict(config, image_shape=[3, image_size, image_size])
    timings = {}
    for name, m in (("latent", copy.deepcopy(model)), ("pixel", build_model(pixel_config).to(device))):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        text, mask = trim_padding(*encoder.encode([TEMPLATES[0].format("rose")] * batch_size))
        x = torch.randn(batch_size, *m.image_shape, device=device)
        for i in range(repeats + 1):
            if i == 1:  # the first step warms up
                t0 = time.time()
            with amp:
                loss = text_conditional_loss(m, x, text, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        timings[name] = (time.time() - t0) / repeats
    print(f"one training step, batch {batch_size}: latent DiT {timings['latent']:.3f}s, pixel DiT "
          f"{timings['pixel']:.3f}s: latents are {timings['pixel'] / timings['latent']:.1f}x faster", flush=True)
    return {"step_seconds_latent": round(timings["latent"], 4), "step_seconds_pixel": round(timings["pixel"], 4),
            "latent_speedup": round(timings["pixel"] / timings["latent"], 1)}


def main(argv=None):
    args = get_args(argv)
    device = get_device(args.device)
    amp = autocast(device, args.precision)
    if device.type == "cpu":  # PyTorch's fused CPU attention trains ~2x slower here than its plain-matmul version;
        torch.backends.cuda.enable_flash_sdp(False)  # despite the name, this flag also switches the CPU kernel
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path, vae_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "vae.pt")
    run_start = time.time()
    budget = 60 * args.max_minutes if args.max_minutes else float("inf")
    metrics = {}

    # What to do: train what is missing (or what --resume / --stage asks for), then sample.
    have_vae, have_ckpt = os.path.exists(vae_path), os.path.exists(ckpt_path)
    if args.sample_only and not (have_vae and have_ckpt):
        fail(f"--sample-only needs {vae_path} and {ckpt_path}: train first (drop --sample-only)")
    if args.stage == "flow" and not have_vae:
        fail(f"--stage flow needs a trained VAE at {vae_path}: run --stage vae (or --stage all) first")
    vae_state = load_checkpoint(vae_path, device) if have_vae else None
    vae = VAE(vae_state["config"]["vae_width"] if vae_state else args.vae_width).to(device)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)
    vae_step = 0
    if vae_state:
        vae.load_state_dict(vae_state["vae"])
        vae_opt.load_state_dict(vae_state["opt"])
        vae_step = vae_state["step"]
    train_vae_now = not args.sample_only and (args.stage == "vae" or (args.stage == "all" and (
        not have_vae or (args.resume and vae_step < args.vae_steps))))
    train_flow_now = not args.sample_only and (args.stage == "flow" or (args.stage == "all" and (
        not have_ckpt or args.resume)))
    state = None
    if have_ckpt and args.stage != "vae" and (not train_flow_now or args.resume or args.stage == "flow"):
        state = load_checkpoint(ckpt_path, device)
    # Sampling needs no data: the flow checkpoint keeps the latent scale and the class names (older ones do not).
    need_data = train_vae_now or train_flow_now or state is None or "latent_scale" not in state["config"]

    # Data: the whole dataset as one uint8 tensor; a fixed held-out set for the VAE's PSNR.
    if need_data:
        data = load_dataset(args.data, args.data_root, image_size=args.image_size).to(device)
        args.classes = data.classes
        train_data, holdout = split_holdout(data)

    # Stage 1: the VAE. With --stage all and --max-minutes, it may use --vae-share of the budget.
    if train_vae_now:
        share = args.vae_share if args.stage == "all" else 1.0
        vae.train()
        vae_step, seconds = train_vae(args, vae, vae_opt, vae_step, train_data, run_start + share * budget, amp)
        metrics.update({"vae_steps": vae_step, "vae_train_seconds": round(seconds, 1)})
    vae.eval().requires_grad_(False)
    if vae_step == 0:
        fail("the VAE has not been trained yet: run --stage vae or --stage all")
    trained = train_vae_now or train_flow_now  # a sampling-only call neither re-measures nor rewrites metrics
    if trained:
        metrics["vae_psnr_db"] = round(psnr_db(vae, holdout), 2)
        save_vae_pictures(args, vae, holdout)
        print(f"VAE (step {vae_step}): held-out reconstruction PSNR {metrics['vae_psnr_db']} dB", flush=True)
    if args.stage == "vae":
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        return

    # Encode once: every training image (and its mirror) becomes a cached, unit-variance latent.
    if need_data:
        latents, scale = encode_dataset(vae, train_data, vae_step, os.path.join(args.out_dir, "latents.pt"))
        metrics["latent_scale"] = round(scale, 5)
        latent_shape = list(latents.latents.shape[1:])
        print(f"latents {latent_shape} ({3 * args.image_size ** 2 / latents.latents[0].numel():.0f}x fewer "
              f"numbers than pixels), scale factor {scale:.4f}", flush=True)

    # Stage 2: the text-conditional DiT of phase 4, on latents.
    if state is not None:
        config = state["config"]  # the model is rebuilt exactly as it was trained, with the same CLIP
    else:
        config = {"image_shape": latent_shape, "patch_size": args.patch_size, "depth": args.depth,
                  "width": args.width, "heads": args.heads, "clip_model": args.clip_model,
                  "pooled_text": args.pooled_text}
    if need_data:
        config.update(latent_scale=scale, classes=list(data.classes))
    else:
        scale, args.classes = config["latent_scale"], config["classes"]
    encoder = CLIPTextEncoder(config["clip_model"], device)
    args.prompt = args.prompt or [TEMPLATES[0].format(name) for name in DEFAULT_FLOWERS]
    check_prompts(args.prompt, encoder)
    config["text_dim"] = encoder.dim
    model = build_model(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        torch.set_rng_state(state["rng"].cpu())  # resume draws the same batches as an uninterrupted run
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        print(f"loaded {ckpt_path} (step {step})", flush=True)
    if args.compare_pixel_speed:
        metrics.update(pixel_vs_latent_step(model, config, encoder, device, amp, args.image_size))

    if train_flow_now:
        if args.max_minutes:  # the flow stage gets what the VAE left of the budget
            args.max_minutes = max(budget - (time.time() - run_start), 1.0) / 60
        print("stage 2: training the flow on latents", flush=True)
        trainer = TextConditionalTrainer(args, model, ema, opt, encoder, latents)
        metrics.update(trainer.train(config, device, amp, step))

    ema.eval()
    metrics.update(generate(args, ema, encoder, vae, scale, device, amp))
    metrics["wall_seconds"] = round(time.time() - run_start, 1)
    if trained:
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
            json.dump({"config": config, **metrics}, f, indent=2)


if __name__ == "__main__":
    main()
