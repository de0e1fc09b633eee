"""
Phase 5 — latent flow matching: a VAE compresses 64x64 flower photos, the flow is learned in its latent space.

New in this phase: latents, the Stable Diffusion idea. A 64x64x3 image is 12,288 numbers, most of them
predictable from their neighbours. A small convolutional VAE learns to squeeze it into a 16x16x4 latent (1,024
numbers, 12x fewer) and back. The flow model then works on latents: noise -> latent -> decoder -> image.
Stage 1 trains the VAE (reconstruction + a small KL term that keeps the latent space smooth); every image is then
encoded once; stage 2 trains the text-conditional DiT of phase 4 on the latents, scaled to unit variance.
And past one device: under torchrun, several copies share every batch and DDP averages their gradients (main).

From phases 1-4: flow matching trains a network v(x_t, t) on the straight path x_t = (1 - t) x0 + t x1 from noise
x0 (t = 0) to data x1 (t = 1), and samples by Euler steps x += dt * v. The network is a DiT (patches as tokens, t
through adaLN) that reads a prompt's CLIP token embeddings through cross-attention (and its last token through
adaLN); classifier-free guidance samples with v = v_uncond + s * (v_cond - v_uncond), "" the unconditional prompt.

Run:
    python phase5_latent.py --prompt "a photo of a sunflower"   # trains the VAE, then the flow, then draws
    python phase5_latent.py --data path/to/my_images --out-dir out/mine   # your own pictures, a folder per class
    python phase5_latent.py --resume --steps 6000                # train the flow further
    python phase5_latent.py --clip-model path/to/clip            # a CLIP saved on disk (offline)
    torchrun --standalone --nproc_per_node 4 phase5_latent.py    # 4 GPUs (or CPU processes), one model
"""
import argparse
import copy
import functools
import json
import math
import os
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from common import (ImageData, Terminated, atomic_write, autocast, check_same_data, check_writable, fail, finite,
                    get_device, gpu_mfu, load_dataset, note_ignored, npz_file, number, parse_args, random_state,
                    set_random_state, settle, step_flops, use_compile)

# ----------------------------------------------------------------------------------------------------------
# Settings: the values of the default run, measured in docs/RESULTS.md

PHASE = 5
DATASET, IMAGE_SIZE = "flowers102", 64   # all 8,189 Flowers-102 photos, or --data: a folder of your own
VAE_STEPS = 4000       # stage 1: VAE optimizer steps
VAE_BATCH_SIZE, VAE_LR, VAE_WIDTH = 32, 1e-3, 32
KL_WEIGHT = 1e-4       # the KL term's weight against the reconstruction error
LATENT_SHAPE = [4, IMAGE_SIZE // 4, IMAGE_SIZE // 4]   # 64x64x3 -> 16x16x4: what the flow works on
HOLDOUT = 300          # images kept out of training, to measure the VAE's reconstruction PSNR
STEPS = 2900           # stage 2: flow optimizer steps
BATCH_SIZE = 128
LR = 1e-3              # peak AdamW learning rate
BETAS = (0.9, 0.95)    # AdamW's memories: 0.95 (not 0.999) for the gradients' scale, so a sudden large gradient
                       # meets a scale that has caught up with it, not an outsized step (a loss spike)
WARMUP_STEPS = 200     # linear warmup from 0 to LR ...
COOLDOWN = 0.3         # ... and a linear decay to 0 over the last 30% of the run
EMA_DECAY = 0.999      # samples come from an exponential moving average of the weights
T_MEAN = 0.0           # training times t = sigmoid(N(T_MEAN, 1)): most of them in the middle of the path
PATCH_SIZE = 2         # 2x2 latent pixels: 64 tokens
DEPTH, WIDTH, HEADS = 6, 192, 4   # transformer blocks, token vector size, attention heads
SAMPLE_STEPS, NUM_SAMPLES = 25, 10   # Euler steps from noise to data; images drawn for each row of samples.png
CLIP_MODEL = "openai/clip-vit-base-patch32"   # the frozen text encoder (its text half)
SYNONYMS = {"common dandelion": ["dandelion"], "purple coneflower": ["echinacea"], "bird of paradise": ["strelitzia"],
            "sunflower": ["helianthus"], "water lily": ["nymphaea"]}   # for your own --data: add its names here
# How a training caption says it (each image gets one at random): {a} "a dog", "an airplane"; {n} "dog"; {s} "dogs".
WORDINGS = ["a photo of {a}", "{n}", "{a}", "the {n}", "{s}", "a photo of the {n}", "a picture of {a}",
            "an image of {a}", "a blurry photo of {a}", "a close-up photo of {a}", "a bright photo of {a}",
            "a dark photo of the {n}", "a low resolution photo of {a}", "a photo of the small {n}", "a big {n}",
            "a photo of my {n}", "a cropped photo of the {n}", "a good photo of {a}", "a snapshot of {a}",
            "a photo of two {s}", "a photo of some {s}", "{s} in a photo", "there is {a} in this picture",
            "this is {a}", "a colour photo of {a}", "a black and white photo of {a}", "an old photo of {a}",
            "a pixelated photo of {a}", "{a}, outdoors", "a photo showing {a}", "the {n} in the photo"]
FLOWERS = ["sunflower", "rose", "daffodil", "water lily", "purple coneflower", "tiger lily", "hibiscus",
           "bird of paradise"]   # default prompts (for your own --data: its first eight classes)
CAPTION_DROPOUT = 0.1  # how often a training caption becomes "" (that trains the unconditional model)
CFG_SCALE = 10.0       # classifier-free guidance scale s (1 = off) ...
CFG_FROM, CFG_UNTIL = 0.3, 0.8   # ... for CFG_FROM <= t < CFG_UNTIL; the plain conditional prediction elsewhere
SWEEP_SCALES = [1, 3, 5, 7, 10]  # rows of cfg_sweep.png; then --cfg-scale on the whole path (what the interval does)
ATTENTION_TIMES = [0.2, 0.5, 0.8]   # columns of attention.png: the points on the path where it looks
CKPT_EVERY = 500       # also save a checkpoint (and a row of progress.png) every this many steps
COMPILE = True         # torch.compile the model on a CUDA GPU: fused kernels, several times faster (slower start)
SHARD = slice(None)    # the part of each batch this process trains on: all of it, unless torchrun starts several
STEPS_ROWS = [1, 2, 4, 8, 16, 50]   # rows of steps.png: the same noise, integrated in this many Euler steps


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Phase 5: latent text-to-image flow matching on Flowers-102.",
                                     epilog='@FILE: more arguments from a file, one a line (or a flag and its value: '
                                     '--prompt "a red car")', fromfile_prefix_chars="@")
    parser.add_argument("--data", default=DATASET, help="'flowers102' or a folder of your own (a sub-folder per class)")
    parser.add_argument("--vae-steps", type=number(int), default=VAE_STEPS, help="stage 1: VAE optimizer steps")
    parser.add_argument("--steps", type=number(int), default=STEPS, help="stage 2: flow optimizer steps")
    parser.add_argument("--max-minutes", type=number(float), help="stop training the flow after this much wall time")
    parser.add_argument("--batch-size", type=number(int), help=f"default {BATCH_SIZE}, or the checkpoint's")
    parser.add_argument("--lr", type=number(float), help=f"peak learning rate (default {LR:g}, or the checkpoint's)")
    parser.add_argument("--depth", type=number(int), default=DEPTH, help="model size: transformer blocks")
    parser.add_argument("--width", type=number(int), default=WIDTH, help=f"model size: token width ({HEADS} heads)")
    parser.add_argument("--prompt", action="append", help='what to draw (repeatable); default: "a photo of a {class}"')
    parser.add_argument("--num-samples", type=number(int), default=NUM_SAMPLES, help="how many images of each prompt")
    parser.add_argument("--sample-steps", type=number(int), default=SAMPLE_STEPS, help="Euler steps from noise to data")
    parser.add_argument("--cfg-scale", type=number(float, 0, True), default=CFG_SCALE, help="CFG scale s (1 = off)")
    parser.add_argument("--resume", action="store_true", help="train <out-dir>/ckpt.pt further, up to --steps")
    parser.add_argument("--save-npz", metavar="PATH", type=npz_file, help="also save the samples as uint8 arrays")
    parser.add_argument("--clip-model", help=f"Hugging Face name or folder of a CLIP (default: {CLIP_MODEL})")
    parser.add_argument("--data-root", default="data", help="where Flowers-102 is, or is downloaded to")
    parser.add_argument("--out-dir", default="out/phase5", help="checkpoint, pictures and metrics go here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="bf16 autocast or fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on "
                        "CUDA only; --no-compile for old GPUs, or Windows without triton)")
    parser.add_argument("--seed", type=number(int, 0, True, 2**64), default=0)
    args = parse_args(parser, argv)
    if args.width % math.lcm(4, HEADS):
        parser.error(f"--width must be a multiple of {math.lcm(4, HEADS)} ({HEADS} heads; the 2-D position code "
                     "splits it in four)")
    if not all(prompt.strip() for prompt in args.prompt or ["ok"]):
        parser.error('empty --prompt: say what to draw, e.g. --prompt "a photo of a dog"')
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

    def __init__(self, width, latent_channels):
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
    x = x[SHARD]  # several processes: this one's share (its noise in vae() is the same draw as the others')
    recon, mean, logvar = vae(x)
    return F.mse_loss(recon, x) + kl_weight * kl_divergence(mean, logvar)


@torch.no_grad()
def psnr_db(vae, images):
    """Reconstruction PSNR (dB) of uint8 images through the posterior means, pixels in [0, 1]."""
    x = images.float() / 127.5 - 1
    mse = ((vae.decode(vae.encode(x)[0]).clamp(-1, 1) - x) / 2).pow(2).mean()
    return float(-10 * torch.log10(mse))


class VAETrainer:
    """Stage 1's loss for the training loop: the images are their own targets (the labels are not used)."""

    def loss(self, vae, x, labels):
        return vae_loss(vae, x, KL_WEIGHT)


class LatentData(ImageData):
    """The training set as normalised latents in `images`; the mirrored images are in it too, so flips are free."""

    def random_batch(self, batch_size, flip=False):
        idx = torch.randint(len(self.images), (batch_size,), device=self.images.device)
        return self.images[idx], self.labels[idx]


@torch.no_grad()
def encode_dataset(vae, data, batch=250):
    """Every training image and its mirror through the encoder, once: (N, 4, 16, 16) latents and their labels.
    The posterior mean, not a sample: each image always gives the same latent."""
    print(f"latents: encoding {len(data.images)} images and their mirrors", flush=True)
    means, labels = [], []
    for i in range(0, len(data.images), batch):
        x = data.images[i:i + batch].float() / 127.5 - 1
        means += [vae.encode(x)[0], vae.encode(x.flip(3))[0]]
        labels += [data.labels[i:i + batch]] * 2
    return torch.cat(means), torch.cat(labels)


# ----------------------------------------------------------------------------------------------------------
# Model: a Diffusion Transformer (DiT) that predicts the velocity v(x_t, t)

def patchify(x, p):
    """(B, C, H, W) -> (B, N, p*p*C): cut the image into p x p patches, row by row, each flattened to a vector."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)      # (B, H/p, W/p, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, p, C, H, W):
    """(B, N, p*p*C) -> (B, C, H, W): the exact inverse of patchify."""
    x = tokens.reshape(-1, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
    return x.reshape(-1, C, H, W)


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


class TimeEmbedding(nn.Module):
    """t in [0, 1] -> a vector. Sinusoids with periods from 2 down to 1/500 of the unit interval, then an MLP."""

    def __init__(self, dim, freq_dim=64, max_freq=1000.0):
        super().__init__()
        # Frequencies 1 ... max_freq, geometrically spaced. A sinusoid meant for integer steps (periods up to
        # 10,000) would barely move while t goes from 0 to 1; these make every t give a distinct embedding.
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(max_freq), freq_dim // 2)))
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):                                                  # t: (B,)
        angles = t[:, None] * self.freqs[None] * math.pi                   # (B, freq_dim/2)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))    # (B, dim)


def names_of(name):
    """A class's names: its own, then the other words people use for it (SYNONYMS)."""
    return [name] + SYNONYMS.get(name, [])


def plural(name):
    """dog -> dogs, puppy -> puppies, bird of paradise -> birds of paradise, deer -> deer: enough for these names."""
    head, of, tail = name.partition(" of ")
    if head in ("deer", "sheep", "aircraft") or head.endswith("s") and not head.endswith(("ss", "us")):
        return name
    if head.endswith("y") and head[-2] not in "aeiou":
        return head[:-1] + "ies" + of + tail
    return head + ("es" if head.endswith(("s", "sh", "ch", "x")) else "s") + of + tail


def caption(wording, name):
    """A wording of WORDINGS with a class name filled in: "a photo of {a}" -> "a photo of an airplane"."""
    return wording.format(a=("an " if name[0] in "aeiou" else "a ") + name, n=name, s=plural(name))


class CLIPTextEncoder:
    """Prompts -> CLIP token embeddings (B, L, Dt) and mask (B, L), L = the longest prompt's tokens. Frozen."""

    def __init__(self, name, device):
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # a full CLIP checkpoint also holds the image tower: unused here, not an error
        hf_logging.disable_progress_bar()  # and no "Loading weights" bar on every run
        print(f"loading CLIP {name!r}" + " (downloaded once, about 600 MB)" * (not os.path.isdir(name)), flush=True)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(name)
            self.model = CLIPTextModel.from_pretrained(name).to(device).eval().requires_grad_(False)
        except Exception as e:  # noqa: BLE001 - not found, offline, not a CLIP folder: all end the same way
            why = " ".join(str(e).split()[:25]) + " ..." * (len(str(e).split()) > 25)  # its first 25 words
            fail(f"could not load CLIP {name!r} ({why}). " + ("Is it a folder written by save_pretrained?" if
                 os.path.isdir(name) else "Offline, pass --clip-model DIR with a CLIP saved by save_pretrained"))
        self.device, self.dim = device, self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts):
        """CLIP runs only as far as the longest prompt: exact, because its attention is causal (no token sees the
        padding after it), and several times less work than CLIP's full 77 tokens for short captions."""
        tokens = self.tokenizer(prompts, padding="longest", return_tensors="pt").to(self.device)
        if tokens.input_ids.shape[1] > self.model.config.max_position_embeddings:  # refused, not silently cut
            fail(f"prompt too long: {tokens.input_ids.shape[1]} tokens, CLIP reads at most 77 (shorten it)")
        mask = tokens.attention_mask.bool()                                       # (B, L), False = padding
        return self.model(**tokens).last_hidden_state.float() * mask[..., None], mask

    def words(self, prompt):
        """The prompt's tokens as text, CLIP's start and end tokens included: attention.png's column labels."""
        names = {self.tokenizer.bos_token: "<start>", self.tokenizer.eos_token: "<end>"}
        return [names.get(w, w.replace("</w>", "")) for w in self.tokenizer.convert_ids_to_tokens(
            self.tokenizer(prompt).input_ids)]


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


class CrossAttention(nn.Module):
    """Image tokens (queries) read the text tokens (keys and values); padding tokens are masked out."""

    def __init__(self, dim, text_dim, heads):
        super().__init__()
        self.heads, self.record = heads, None  # record: a list to append the attention probabilities to
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(text_dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, text, mask):                        # x: (B, N, D), text: (B, L, Dt), mask: (B, L)
        B, N, D = x.shape
        q = self.q(x).reshape(B, N, self.heads, D // self.heads).transpose(1, 2)                    # (B, h, N, D/h)
        k, v = self.kv(text).reshape(B, -1, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, D/h)
        if self.record is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # True = may attend
        else:  # the same attention written out, to keep its probabilities for attention.png
            scores = (q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)).masked_fill(~mask[:, None, None], -math.inf)
            probs = scores.softmax(-1)                                                      # (B, h, N, L)
            self.record.append(probs.mean(1))                                               # mean over heads
            out = probs @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """LayerNorm (no learned affine) -> adaLN modulate -> attention -> gate; the same around an MLP."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # Exact GELU; DiT used its tanh approximation, which PyTorch computes more slowly on a CPU.
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # c -> shift, scale, gate for both halves

    def forward(self, x, c):                                    # x: (B, N, D) tokens, c: (B, D) conditioning
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class TextConditionedDiTBlock(DiTBlock):
    """The DiT block, reading the prompt too: self-attention, then cross-attention to the text, then the MLP."""

    def __init__(self, dim, heads, text_dim):
        super().__init__(dim, heads)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, text_dim, heads)

    def forward(self, x, c, text, mask):        # x: (B, N, D) tokens, c: (B, D), text: (B, L, Dt), mask: (B, L)
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
    """patchify -> embed + 2-D positions -> blocks (adaLN from t and the prompt, cross-attention to its tokens)
    -> unpatchify."""

    def __init__(self, image_shape, patch_size, depth, width, heads, text_dim):
        super().__init__()
        self.image_shape, self.patch_size = tuple(image_shape), patch_size
        C, H, W = self.image_shape
        patch_dim = patch_size * patch_size * C
        self.patch_embed = nn.Linear(patch_dim, width)
        self.register_buffer("pos_embed", sincos_2d(width, H // patch_size, W // patch_size))  # (N, D), fixed
        self.time_embed = TimeEmbedding(width)
        # The prompt as one vector too (CLIP's end token, which has read all of it), added to t's embedding like a
        # class embedding: every block hears what the picture is; cross-attention tells each patch where.
        self.text_embed = nn.Sequential(nn.Linear(text_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([TextConditionedDiTBlock(width, heads, text_dim) for _ in range(depth)])
        # CLIP's token vectors share one large common part and differ, word by word, in a small rest (the offline
        # stand-in's are 98% alike). Standardising each feature with the mean and spread of the training captions'
        # tokens (set once, in main) puts that rest at full scale for the cross-attention.
        self.register_buffer("text_mean", torch.zeros(text_dim))
        self.register_buffer("text_std", torch.ones(text_dim))
        self.final = FinalLayer(width, patch_dim)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # adaLN-Zero: the modulation layers start at zero, so every gate is 0 and every block is exactly the
        # identity at step 0. A deep stack then starts as a shallow, well-behaved network and each block learns
        # how much to contribute; DiT found this trains faster and more stably than any other conditioning.
        # Cross-attention's output projection starts at zero as well (as in PixArt), so each whole block does.
        # The output layer starts at zero too: the model first predicts v = 0, a calm start for the loss.
        zero = [layer for block in self.blocks for layer in (block.adaLN[-1], block.cross.proj)]
        for layer in zero + [self.final.adaLN[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, text, mask):       # x: (B, C, H, W), t: (B,), text: (B, L, Dt), mask: (B, L)
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed   # (B, N, D)
        text = (text - self.text_mean) / self.text_std                # (B, L, Dt), standardised
        pooled = text[torch.arange(len(text), device=text.device), mask.sum(1) - 1]   # (B, Dt): each end token
        c = self.time_embed(t) + self.text_embed(pooled)              # (B, D): "how noisy" + "what"
        for block in self.blocks:
            tokens = block(tokens, c, text, mask)                     # (B, N, D)
        patches = self.final(tokens, c)                               # (B, N, p*p*C)
        return unpatchify(patches, self.patch_size, *self.image_shape)  # velocity, like x


# ----------------------------------------------------------------------------------------------------------
# Flow matching: the loss and the sampler (the whole algorithm)

def sample_t(batch_size, device, mean=0.0):
    """Training times, logit-normal: sigmoid(N(mean, 1)) is dense around sigmoid(mean) and thin at the easy ends
    (near t=1 the answer is almost visible, near t=0 it is the data mean). mean < 0 leans towards the noise end,
    where the layout of the image is decided. (Plain torch.rand is the uniform choice; it trains worse.)"""
    return torch.sigmoid(mean + torch.randn(batch_size, device=device))


def interpolate(x0, x1, t):
    """The straight path from noise x0 (t=0) to data x1 (t=1): x_t = (1 - t) x0 + t x1, and its velocity."""
    t = t.view(-1, *[1] * (x0.dim() - 1))                      # (B,) -> (B, 1, 1, 1) to broadcast over pixels
    return (1 - t) * x0 + t * x1, x1 - x0


def text_conditional_loss(model, x1, text, mask, t_mean=0.0):
    """Flow-matching loss for v(x_t, t, text). A dropped caption is the empty prompt (TextConditionalTrainer), so
    the same network also learns the unconditional v(x_t, t, "")."""
    x0 = torch.randn_like(x1)                                  # noise
    t = sample_t(len(x1), x1.device, t_mean)
    xt, target = interpolate(x0, x1, t)
    s = SHARD  # several processes: all drew the same numbers for the whole batch; each computes its share
    return F.mse_loss(model(xt[s], t[s], text[s], mask[s]), target[s])


@torch.no_grad()
def euler_sample(velocity, noise, steps):
    """Integrate dx/dt = velocity(x, t) from t=0 (noise) to t=1 (data) in equal Euler steps.
    Returns the final x and the list of all the x_t on the way (for pictures)."""
    x, dt, trajectory = noise, 1.0 / steps, [noise]
    for i in range(steps):
        t = torch.full((len(x),), i * dt, device=x.device)
        x = x + dt * velocity(x, t)
        trajectory.append(x)
    return x, trajectory


def guided_velocity(model, x, t, ids, cfg_scale, table, interval=None):
    """v_uncond + s * (v_cond - v_uncond), both predictions from ONE forward pass over a doubled batch.

    ids (B,) picks rows of the caption table = (text (K, L, Dt), mask (K, L)); its last row is "" (null)."""
    (text, mask), (start, until) = table, interval or (CFG_FROM, CFG_UNTIL)
    null = torch.full_like(ids, len(text) - 1)
    if cfg_scale == 1 or not start <= t[0] < until:  # s = 1, or outside the guided interval: the
        return model(x, t, text[ids], mask[ids])     # conditional prediction alone, one pass instead of two
    if cfg_scale == 0:
        return model(x, t, text[null], mask[null])   # s = 0 is the unconditional prediction
    both = torch.cat([ids, null])
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), text[both], mask[both]).chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def sample_conditional(model, ids, cfg_scale, steps, noise, table, interval=None):
    """Euler sampling of images of the caption table rows ids (B,), guided at cfg_scale (t in interval), from noise."""
    return euler_sample(lambda x, t: guided_velocity(model, x, t, ids, cfg_scale, table, interval), noise, steps)


def sample_text_conditional(model, table, per_prompt, cfg_scale, steps, gen):
    """per_prompt images of each prompt in the caption table = (text, mask) (its last row is the empty prompt),
    prompt by prompt (a row each in the grid), and their rows of the table (ids). The noise comes from the CPU
    generator gen (the same images on every device), in chunks of 500 (10,000 samples fit in a laptop's memory)."""
    ids, images = torch.arange(len(table[0]) - 1).repeat_interleave(per_prompt), []
    for chunk in ids.split(500):
        noise = torch.randn(len(chunk), *LATENT_SHAPE, generator=gen).to(model.pos_embed.device)
        images.append(sample_conditional(model, chunk.to(noise.device), cfg_scale, steps, noise, table)[0].cpu())
    return torch.cat(images), ids


def sample_with_attention(model, ids, cfg_scale, steps, noise, table, times):
    """sample_conditional, with every cross-attention keeping its probabilities. Returns the images, the trajectory
    and, at the Euler steps nearest to `times`, {t: (B, N, L)}: the share of each patch's attention that went to
    each token, mean over heads and blocks, of the conditional half (the other half reads only the empty prompt)."""
    records, maps, keep = [], {}, [round(t * steps) for t in times]
    for block in model.blocks:
        block.cross.record = records

    def velocity(x, t):
        records.clear()
        v = guided_velocity(model, x, t, ids, cfg_scale, table)
        if round(t[0].item() * steps) in keep:
            maps[t[0].item()] = torch.stack(records).mean(0)[:len(x)].float()
        return v
    x, trajectory = euler_sample(velocity, noise, steps)
    for block in model.blocks:
        block.cross.record = None
    return x, trajectory, maps


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one file with everything needed to resume or to sample

def save_checkpoint(path, model, ema, opt, step, config, extra):
    state = {"phase": PHASE, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
             "step": step, "config": config, **random_state(next(model.parameters()).device), **extra}
    atomic_write(path, lambda f: torch.save(state, f))  # a kill or a full disk never leaves a broken ckpt.pt


def load_checkpoint(path, phase=PHASE, fix="move it away or use another --out-dir"):
    """Tensors and plain data only (weights_only: a crafted file runs no code), into CPU memory on every device
    (restore() copies each tensor to its module's device); another phase's checkpoint is refused: `fix` says why."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["config"], state["step"]  # noqa: B018 - check the keys exist
    except Exception as e:  # noqa: BLE001
        fail(f"checkpoint {path} is unreadable ({type(e).__name__}); {fix}")
    if state.get("phase") != phase:
        who = f"phase {state['phase']}" if "phase" in state else "an older version of these scripts"
        fail(f"{path} was written by {who}, not phase {phase}: {fix}")
    return state


def restore(path, state, modules):
    """Load each module's saved weights (or optimizer state); a checkpoint of another model is a clean error."""
    try:
        for key, module in modules.items():
            module.load_state_dict(state[key])
    except (KeyError, ValueError, RuntimeError) as e:
        fail(f"{path} does not fit this script's model ({type(e).__name__}): use another --out-dir")


# ----------------------------------------------------------------------------------------------------------
# Training loop

class TextConditionalTrainer:
    """Captions for the training loop. Every caption (each class by each of its names in every wording, and the
    empty prompt) goes through CLIP once, up front, into one table on the device; a batch only looks rows up."""

    def __init__(self, encoder, classes):
        per_class = [list(dict.fromkeys(caption(w, n) for n in names_of(c) for w in WORDINGS)) for c in classes]
        self.captions = sum(per_class, []) + [""]                          # K captions; "" is the last row
        self.text, self.mask = encoder.encode(self.captions)               # (K, L, Dt), (K, L)
        real = self.text[self.mask]                                        # every real token: (tokens, Dt)
        self.text_mean, self.text_std = real.mean(0), real.std(0) + 1e-6   # for the model's standardisation
        count = torch.tensor([len(captions) for captions in per_class])  # cumsum on the CPU (MPS: macOS 13.3+)
        self.count, self.first = count.to(self.text.device), (count.cumsum(0) - count).to(self.text.device)

    def loss(self, model, x1, labels):
        """A random caption of each image's class, or (caption dropout) the empty prompt; then flow matching."""
        ids = self.first[labels] + (torch.rand(labels.shape, device=labels.device) * self.count[labels]).long()
        drop = torch.rand(labels.shape, device=labels.device) < CAPTION_DROPOUT
        ids = torch.where(drop, torch.full_like(ids, len(self.text) - 1), ids)
        return text_conditional_loss(model, x1, self.text[ids], self.mask[ids], T_MEAN)


def train(args, model, ema, opt, data, amp, step, save, trainer):
    """Train until --steps or --max-minutes; `save(step)` checkpoints periodically, at the end and on Ctrl-C."""

    def batch_loss():  # a random batch through the model: the lines of this loop that the later phases change
        x1, labels = data.random_batch(args.batch_size, flip=True)  # mirrored photos are photos too
        with amp:  # forward pass in bf16 where it is fast (see common.autocast); the loss in fp32
            return trainer.loss(model, x1, labels)

    params, ema_params = list(model.parameters()), list(ema.parameters())
    n_params = sum(p.numel() for p in params)
    print(f"training {n_params / 1e6:.2f}M parameters from step {step} to {args.steps}", flush=True)
    flops = step_flops(batch_loss) if params[0].is_cuda else 0  # per step, for the MFU (see common.gpu_mfu)
    t_start, start_step, smooth_loss, saved, stop = time.time(), step, None, step, None  # saved: the step on disk
    t_line, step_line = t_start, step
    minutes = lambda: (time.time() - t_start) / 60  # noqa: E731
    while step < args.steps and not (args.max_minutes and minutes() >= args.max_minutes):
        try:
            # How far the run is, 0 to 1, in steps or in minutes, whichever runs out first.
            done = max(step / args.steps, minutes() / args.max_minutes if args.max_minutes else 0)
            for group in opt.param_groups:  # linear warmup, constant, linear cooldown to 0 over the last COOLDOWN
                group["lr"] = args.lr * min(1.0, (step + 1) / WARMUP_STEPS, max(1.0 - done, 0.0) / COOLDOWN)
            loss = batch_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # one bad batch cannot wreck the weights
            opt.step()
            # EMA of the weights: a running average that samples better than the noisy latest weights, in one call
            # for all of them. The decay ramps up from 0 so that early EMA weights are not stuck near the init.
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - min(EMA_DECAY, (1 + step) / (10 + step)))
            step += 1
            # The smoothed loss stays on the device: reading it (.item()) makes the CPU wait for the GPU to finish,
            # so it is read only to print it, and to check it is a number before a save.
            smooth_loss = loss.detach() if smooth_loss is None else smooth_loss.lerp(loss.detach(), 0.02)
            if step % 25 == 0 or step == args.steps:  # one updating line in a terminal, a line each in a log file
                rate = (step - step_line) / (time.time() - t_line)
                t_line, step_line = time.time(), step
                mfu = gpu_mfu(flops * rate)  # None off CUDA
                line = (f"step {step}/{args.steps} | loss {finite(smooth_loss, step):.4f} | {rate:.1f} it/s, "
                        f"{rate * args.batch_size:.0f} images/s" + (f" | MFU {mfu:.1%}" if mfu else "")
                        + f" | ETA {(args.steps - step) / rate / 60:.1f} min")
                print(line, end="\r" if sys.stdout.isatty() else "\n", flush=True)
            if step % CKPT_EVERY == 0:
                finite(smooth_loss, step)  # a diverged model never reaches the disk
                save(step)
                saved = step
        except KeyboardInterrupt as e:  # Ctrl-C, or a kill (SIGTERM, see main)
            print("\ninterrupted" + ": saving a checkpoint" * (step > 0), flush=True)
            stop = e
            break
    print("" if step == args.steps or stop else "--max-minutes reached: --resume trains on", flush=True)
    if step == 0:
        fail("stopped before the first training step: there is nothing to save")
    if saved != step:  # the end, or Ctrl-C: unless the periodic save just wrote this very step
        finite(smooth_loss, step)
        save(step)
    if isinstance(stop, Terminated):  # a job scheduler must see a stopped run, not a finished one
        fail(f"stopped by SIGTERM at step {step}, saved: add --resume to the command to train on")
    seconds = 60 * minutes()
    return {"steps": step, "train_seconds": round(seconds, 1), "params": n_params,
            "final_smooth_loss": finite(smooth_loss, step),
            "train_images_per_s": round((step - start_step) * args.batch_size / max(seconds, 1e-9), 1),
            "mfu": gpu_mfu(flops * (step - start_step) / max(seconds, 1e-9))}


# ----------------------------------------------------------------------------------------------------------
# Outputs: a row per prompt, trajectory, steps, progress, CFG sweep, attention, arrays for evaluation

def save_grid(images, path, nrow, titles=()):
    """A grid of [-1, 1] images, small ones drawn 2x (28 and 32 pixels: 56 and 64), saved to path (if given) and
    returned; with titles, a white strip on the left gives each row its text."""
    images = F.interpolate(images, scale_factor=max(1, 64 // images.shape[-1]))        # nearest: sharp pixels
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    titles = [" ".join(title.split()) for title in titles]  # one line each, whatever a prompt held
    font = ImageFont.load_default(size=13)  # a TrueType font whose letters do not touch
    strip_w = 8 + max(round(font.getlength(title)) for title in titles) if titles else 0
    canvas = Image.new("RGB", (strip_w + grid.shape[2], grid.shape[1]), "white")
    canvas.paste(Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()), (strip_w, 0))
    for i, title in enumerate(titles):  # in the middle of its row
        top = (i + 0.5) * (grid.shape[1] - 1) / len(titles) - 8
        ImageDraw.Draw(canvas).text((4, top), title, fill="black", font=font)
    if path:
        canvas.save(path)
    return canvas


def save_attention(path, images, trajectory, maps, prompts, words):
    """attention.png. For each prompt, a row: x_t at each t of `maps`, then the sample. Under it, a row per token
    (the words and CLIP's start and end tokens; padding left out): where the patches read that token at each t
    (white = the most that token gets), and, beside the token, its share of all the attention, averaged."""
    steps, tiles, titles = len(trajectory) - 1, [], []
    for k, tokens in enumerate(words):
        weights = torch.stack([m[k, :, :len(tokens)] for m in maps.values()]).cpu()  # (T, N patches, tokens)
        side = math.isqrt(weights.shape[1])                                          # the patch grid's side
        heat = F.interpolate(weights.transpose(1, 2).unflatten(2, (side, side)), size=images.shape[-2:])
        heat = (heat / heat.amax(dim=(0, 2, 3), keepdim=True) * 2 - 1)[:, :, None]  # (T, tokens, 1, H, W)
        tiles += [trajectory[round(t * steps)][k].cpu() for t in maps] + [images[k].cpu()]
        for j in range(len(tokens)):
            tiles += [heat[i, j].expand_as(images[k]) for i in range(len(maps))] + [torch.ones_like(tiles[-1])]
        titles += [prompts[k]] + [f"{w}  {share:.0%}" for w, share in zip(tokens, weights.mean((0, 1)))]
    save_grid(torch.stack(tiles), path, nrow=len(maps) + 1, titles=titles)


def class_of_prompt(prompt, classes):
    """The class a prompt names by any of its names ("two puppies": dog), for evaluation; -1 if none or several.
    A name that is a word of a longer one the prompt holds does not count ("rose" in "desert-rose")."""
    found = {}  # class -> the longest of its names in the prompt
    for i, name in enumerate(classes):
        for n in names_of(name):
            said = re.search(rf"\b({re.escape(n)}|{re.escape(plural(n))})\b", prompt.lower())
            if said and len(n) > len(found.get(i, "")):
                found[i] = n
    named = [i for i, n in found.items() if not any(n != m and re.search(rf"\b{re.escape(n)}\b", m)
                                                     for m in found.values())]
    return named[0] if len(named) == 1 else -1


@torch.no_grad()
def decode(vae, latents, scale, batch=250):
    """Normalised latents -> images in [-1, 1]: undo the scale, then the VAE decoder."""
    return torch.cat([vae.decode(latents[i:i + batch] / scale) for i in range(0, len(latents), batch)]).float()


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


def generate(args, model, table, words, vae, config, device, amp):
    """Sample --num-samples per prompt; write samples.png, trajectory.png/.gif, steps.png, cfg_sweep.png,
    attention.png and (optionally) the npz. `words`: each prompt's tokens, for attention.png."""
    gen, t0 = torch.Generator().manual_seed(args.seed), time.time()
    with amp:  # x stays fp32: x + dt * v promotes the bf16 velocity
        latents, ids = sample_text_conditional(model, table, args.num_samples, args.cfg_scale,
                                                  args.sample_steps, gen)
        images = decode(vae, latents.to(device), config["latent_scale"]).cpu()   # latents -> pictures
    seconds = time.time() - t0
    cols = min(args.num_samples, 10)  # grid: one row per prompt, up to 10 samples each
    save_grid(images.view(len(args.prompt), args.num_samples, *images.shape[1:])[:, :cols].flatten(0, 1),
              os.path.join(args.out_dir, "samples.png"), nrow=cols, titles=args.prompt)
    # Five more pictures, from one noise per prompt: how noise becomes a picture (a strip of 9 moments and an animation
    # of every step), fewer Euler steps, the guidance scale, and which words each patch reads (as the strip is drawn).
    rows = ids[::args.num_samples][:16].to(device)  # one per prompt, of the first 16 (thousands would not fit)
    noise, prompts = torch.randn(len(rows), *LATENT_SHAPE, generator=gen).to(device), args.prompt[:len(rows)]
    with amp:
        x, traj, maps = sample_with_attention(model, rows, args.cfg_scale, args.sample_steps, noise, table,
                                              ATTENTION_TIMES)
        by_steps = [sample_conditional(model, rows, args.cfg_scale, n, noise, table)[0] for n in STEPS_ROWS]
        sweep = [sample_conditional(model, rows, s, args.sample_steps, noise, table)[0] for s in SWEEP_SCALES]
        sweep.append(sample_conditional(model, rows, args.cfg_scale, args.sample_steps, noise, table, (0, 1))[0])
        (x,), traj, by_steps, sweep = ([decode(vae, x, config["latent_scale"]) for x in xs]  # latents -> pictures
                                       for xs in ([x], traj, by_steps, sweep))
    strip = torch.stack([traj[round(i * args.sample_steps / 8)].cpu() for i in range(9)], 1)  # rows = prompts,
    save_grid(strip.flatten(0, 1), os.path.join(args.out_dir, "trajectory.png"), nrow=9,  # columns = t from 0 to 1
              titles=prompts)
    save_grid(torch.cat(by_steps), os.path.join(args.out_dir, "steps.png"), nrow=len(noise),
              titles=[f"{n} step" + "s" * (n > 1) for n in STEPS_ROWS])
    save_grid(torch.cat(sweep), os.path.join(args.out_dir, "cfg_sweep.png"), nrow=len(noise),
              titles=[f"cfg scale {s}" for s in SWEEP_SCALES] + [f"cfg scale {args.cfg_scale:g}, every t"])
    save_attention(os.path.join(args.out_dir, "attention.png"), x, traj, maps, prompts, words[:len(rows)])
    frames = [save_grid(x.cpu(), None, nrow=len(noise)) for x in traj]  # every Euler step, drawn as the pictures are
    frames[0].save(os.path.join(args.out_dir, "trajectory.gif"), save_all=True, append_images=frames[1:], loop=0,
                   duration=[60] * (len(frames) - 1) + [1500])  # ms per frame; the finished pictures stay 1.5 s
    if args.save_npz:  # for an evaluation: uint8, (N, H, W) grey or (N, H, W, 3) RGB
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).squeeze(-1).numpy()
        named = np.array([class_of_prompt(prompt, config["classes"]) for prompt in args.prompt])  # -1: no class named
        atomic_write(args.save_npz, lambda f: np.savez_compressed(f, images=uint8, labels=named[ids.numpy()]))
    print(f"sampled {len(images)} images in {seconds:.1f}s ({args.sample_steps} Euler steps, CFG scale "
          f"{args.cfg_scale:g}) -> {args.out_dir}" + (f" and {args.save_npz}" if args.save_npz else ""), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Main: the VAE (trained if missing), the latents, the flow (trained if missing, or --resume), then samples

def setup_torchrun(args, device):
    """Past one device: `torchrun --nproc_per_node N phase5_latent.py` starts N copies of this script. They all
    draw the same random numbers (same seed), so they pick the same batch; each computes the loss on its share
    (SHARD) and DDP averages the gradients: the weights stay identical in every copy, and equal to one process
    training on the whole batch. Copy 0 (or the only one) writes and prints. Returns the device, and if copy 0."""
    global SHARD
    if "RANK" in os.environ:  # set by torchrun
        if device.type == "mps":  # gloo carries no MPS tensors: the gradients would not be averaged
            fail("torchrun cannot share Apple Silicon's MPS device: add --device cpu, or run without torchrun")
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except (ValueError, RuntimeError) as e:  # RANK set by hand, without torchrun's other variables
            fail(f"RANK is set but this is not a torchrun launch ({str(e).splitlines()[0][:100]}): unset RANK")
        SHARD = slice(dist.get_rank(), None, dist.get_world_size())
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per copy
            torch.cuda.set_device(device)
        if (args.batch_size or BATCH_SIZE) % dist.get_world_size() or VAE_BATCH_SIZE % dist.get_world_size():
            fail(f"{dist.get_world_size()} processes cannot share --batch-size {args.batch_size or BATCH_SIZE} "
                 f"(and the VAE's {VAE_BATCH_SIZE}) equally")
    first = SHARD.start in (None, 0)
    sys.stdout = sys.stdout if first else open(os.devnull, "w")
    return device, first


def vae_stage(args, vae_path, flow_exists, data, data_name, device, amp, first, wrap, compile_now):
    """Stage 1, the VAE (vae.pt): trained up to --vae-steps (a stopped one goes on with the same command), then its
    PSNR and pictures (recorded in vae.pt: a rerun draws what an interrupt skipped); once a flow depends on it, it
    stays as it is. data(): the images, when needed. Returns the VAE's EMA (it encodes and decodes), step, metrics."""
    vae = VAE(VAE_WIDTH, LATENT_SHAPE[0]).to(device)
    vae_ema = copy.deepcopy(vae).requires_grad_(False)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0, fused=True)
    state = {"step": 0, "config": {}}  # no vae.pt yet: a new VAE
    if os.path.exists(vae_path):
        state = load_checkpoint(vae_path)
        restore(vae_path, state, {"model": vae, "ema": vae_ema, "opt": vae_opt})
    config, step = state["config"], state["step"]   # config: what it trains on, and how long
    config["steps"] = args.vae_steps if args.resume or not step else config.get("steps", step)
    if flow_exists and step == 0:
        fail(f"the flow in {args.out_dir} has no trained VAE beside it ({vae_path}): use another --out-dir")
    if compile_now:
        for module in (vae, vae_ema):  # in place: the weights, and so the checkpoints, stay as they are
            module.compile()
    save = lambda s: first and save_checkpoint(vae_path, vae, vae_ema, vae_opt, s, config, {})  # noqa: E731
    metrics = {}
    if not flow_exists and step < config["steps"]:
        print("stage 1: the VAE", flush=True)
        check_same_data(config, data()[0], data_name, vae_path)
        config.pop("psnr_db", None)  # of fewer steps
        vae_args = argparse.Namespace(**{**vars(args), "steps": config["steps"], "batch_size": VAE_BATCH_SIZE,
                                         "lr": VAE_LR, "max_minutes": None})  # the flow's loop, the VAE's settings
        metrics["vae"] = train(vae_args, wrap(vae), vae_ema, vae_opt, data()[1], amp, step, save, VAETrainer())
        step = metrics["vae"]["steps"]
        if step < config["steps"]:  # Ctrl-C: stop here rather than train a flow on a half-trained VAE
            raise SystemExit(f"the VAE is saved at step {step}; the same command goes on from there")
    if first and not flow_exists and "psnr_db" not in config:
        config["psnr_db"] = round(psnr_db(vae_ema, data()[2]), 2)
        save_vae_pictures(args, vae_ema, data()[2])
        save(step)  # now with its PSNR: the VAE's results are written
        print(f"VAE (step {step}): held-out reconstruction PSNR {config['psnr_db']} dB", flush=True)
    return vae_ema, step, {**metrics, "vae_psnr_db": config.get("psnr_db")}


def main(argv=None):
    args = get_args(argv)
    signal.signal(signal.SIGTERM, Terminated.handler)  # a kill (a cluster's preemption) saves, then stops
    device, first = setup_torchrun(args, get_device(args.device))

    def wrap(model):  # what train() runs: with several processes, DDP around the model, averaging the gradients
        return DDP(model, [device.index] if device.type == "cuda" else None) if dist.is_initialized() else model
    amp = autocast(device, args.precision)
    torch.manual_seed(args.seed)
    if first:
        check_writable(args.out_dir, args.save_npz)
    ckpt_path, vae_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "vae.pt")
    state = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
    if state is None and args.resume and not os.path.exists(vae_path):
        fail(f"no checkpoint at {ckpt_path} to resume: train first (without --resume), or fix --out-dir")
    training = state is None or (args.resume and state["step"] < args.steps)
    compile_now = use_compile(args.compile, COMPILE, device)

    @functools.cache  # loaded once, by the first stage that needs it
    def data():  # the whole dataset as one uint8 tensor, the images that train both stages, and a held-out set
        everything = load_dataset(args.data, args.data_root, image_size=IMAGE_SIZE).to(device)
        if len(everything.images) < 10:
            fail(f"{args.data}: {len(everything.images)} images; at least 10 are needed (a tenth is held out)")
        # The held-out images measure the VAE's PSNR: the same ones for every seed and run.
        order = torch.randperm(len(everything.images), generator=torch.Generator().manual_seed(1234)).to(device)
        n, images, labels = min(HOLDOUT, len(order) // 10), everything.images, everything.labels
        return everything, ImageData(images[order[n:]], labels[order[n:]], everything.classes), images[order[:n]]
    data_name = args.data if args.data == "flowers102" else os.path.abspath(args.data)

    vae, vae_step, metrics = vae_stage(args, vae_path, state is not None, data, data_name, device, amp, first,
                                       wrap, compile_now)

    # Stage 2, the flow: the text-conditional DiT of phase 4, on latents.
    config = state["config"] if state else {"patch_size": PATCH_SIZE, "depth": args.depth, "width": args.width,
                                            "heads": HEADS, "vae_step": vae_step,
                                            "classes": data()[0].classes}  # a checkpoint rebuilds the model it trained
    settle(args, config, {"batch_size": BATCH_SIZE, "lr": LR})  # a resume trains on as its run began
    if config.get("vae_step", vae_step) != vae_step:
        fail(f"{ckpt_path} was trained on the latents of the VAE at step {config['vae_step']}, not {vae_step}")
    # Encode once: every training image (and its mirror) becomes a latent, scaled to unit variance like the noise
    # it is matched with (Stable Diffusion's 0.18215 is this number, for its VAE).
    if training:
        everything, train_data, _ = data()
        check_same_data(config, everything, data_name, ckpt_path)
        latents, labels = encode_dataset(vae, train_data)
        scale = config.setdefault("latent_scale", float(1 / latents.std()))
        latents = LatentData(latents * scale, labels, train_data.classes)
    clip_name = args.clip_model or config.get("clip_model", CLIP_MODEL)  # --clip-model on the command line wins
    encoder = CLIPTextEncoder(clip_name, device)
    names = [name for name in FLOWERS if name in config["classes"]] or config["classes"][:8]
    args.prompt = args.prompt or [caption(WORDINGS[0], name) for name in names]
    table = encoder.encode(args.prompt + [""])  # the prompts, then "" (the null condition): a bad one stops the run now
    clip_name = os.path.abspath(clip_name) if os.path.isdir(clip_name) else clip_name  # found from anywhere
    if training and os.path.basename(config.setdefault("clip_model", clip_name)) != os.path.basename(clip_name):
        fail(f"{ckpt_path} was trained with CLIP {config['clip_model']!r}: train it further with that one (sampling "
             f"with another is fine), or use another --out-dir")
    config["clip_model"] = clip_name  # the same CLIP (a folder may have moved): its new place
    if config.setdefault("text_dim", encoder.dim) != encoder.dim:
        fail(f"{clip_name!r} gives {encoder.dim}-wide token vectors; this model was trained on {config['text_dim']}")
    model = TextConditionalDiT(LATENT_SHAPE, config["patch_size"], config["depth"], config["width"], config["heads"],
                               config["text_dim"]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    # fused: one kernel updates all the weights (on CUDA, CPU and MPS)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=BETAS, weight_decay=0.0, fused=True)
    step, progress = 0, state.get("progress", []) if state else []  # progress.png's rows: (step, 8 images)
    if state:
        restore(ckpt_path, state, {"model": model, "ema": ema, "opt": opt})
        step = state["step"]
        set_random_state(state, device)  # resume draws the same batches as an uninterrupted run
        print(f"found {ckpt_path} (step {step}): " + ("training it further" if training else "sampling from it"
              + (" (it has --steps already: raise --steps to train further)" if args.resume else "")), flush=True)
        note_ignored(args, {**config, "vae_steps": vae_step}, {"depth": DEPTH, "width": WIDTH, "vae_steps": VAE_STEPS})
    if compile_now:
        for module in (model, ema):
            module.compile()

    if training:
        print("stage 2: the flow, on latents", flush=True)
        trainer = TextConditionalTrainer(encoder, config["classes"])
        if step == 0:  # a new model learns its text standardisation from its training captions, once
            for module in (model, ema):
                module.text_mean.copy_(trainer.text_mean), module.text_std.copy_(trainer.text_std)
        noise = torch.randn(8, *LATENT_SHAPE, generator=torch.Generator().manual_seed(args.seed)).to(device)

        def save(s):  # a checkpoint, and a row of progress.png: the same 8 noises, "a photo of" the first 8 classes
            if not first:
                return
            first8 = torch.arange(8, device=device) % len(config["classes"])  # (your --data may have fewer)
            with amp:
                x, _ = sample_conditional(ema, trainer.first[first8], args.cfg_scale, args.sample_steps, noise,
                                          (trainer.text, trainer.mask))
            row = (s, decode(vae, x, config["latent_scale"]).cpu())
            save_checkpoint(ckpt_path, model, ema, opt, s, config, {"progress": progress + [row]})
            progress.append(row)  # the picture shows only what is on disk
            save_grid(torch.cat([x for _, x in progress]), os.path.join(args.out_dir, "progress.png"), nrow=8,
                      titles=[f"step {s}" for s, _ in progress])
        metrics.update(train(args, wrap(model), ema, opt, latents, amp, step, save, trainer))
    if dist.is_initialized():  # training is over: copy 0 alone samples
        dist.destroy_process_group()
        if not first:
            return
    if training:  # before sampling: an interrupt there keeps them (and sampling again never rewrites them)
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
            json.dump({"config": config, **metrics}, f, indent=2)
    generate(args, ema, table, [encoder.words(prompt) for prompt in args.prompt], vae, config, device, amp)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside training (loading data, sampling): nothing to save
        fail("interrupted")
