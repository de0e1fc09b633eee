"""
Phase 6 — reflow: phase 5's flow straightened, so that one Euler step from noise is the picture.

New in this phase: the teacher's own pairs. Phase 5 learned to carry noise to flowers along straight lines between
a noise and a photo picked at random; its paths bend where many lines cross (the network predicts their average),
so it needs 25 Euler steps, each a doubled CFG batch: 50 network calls per picture. Reflow (rectified flow, Liu et
al., 2023; InstaFlow made Stable Diffusion draw in one step with it, 2024) runs the teacher once on many noises z,
guided as usual, and keeps each pair (z, x1 = the teacher's picture of z). A student, started from the teacher's
weights, learns the straight line from z to ITS x1 with the same flow-matching loss. These lines come from one
flow, so they do not cross: the student's paths are straight, the guidance is inside them (no CFG doubling), and
x1 = z + v(z, 0) is one network call. Phase 6 trains no VAE: it decodes with the teacher's.

From phases 1-5: flow matching trains a network v(x_t, t) on the straight path x_t = (1 - t) x0 + t x1 from noise
x0 (t = 0) to data x1 (t = 1), and samples by Euler steps x += dt * v. The network is a DiT (patches as tokens, t
through adaLN) that reads a prompt's CLIP token embeddings through cross-attention (and its last token through
adaLN), on the 16x16x4 latents of a VAE; classifier-free guidance samples with v = v_uncond + s * (v_cond - v_uncond).

Run (after phase 5, which trains the teacher into out/phase5):
    python phase6_reflow.py --prompt "a photo of a sunflower"   # the teacher's pairs, the student, then one step
    python phase6_reflow.py --interactive                       # type prompts: a picture each, at once
    python phase6_reflow.py --teacher out/mine --out-dir out/mine6   # the student of another phase-5 run
    python phase6_reflow.py --resume --steps 2000               # train the student further
"""
import argparse
import copy
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

from common import (ImageData, Terminated, atomic_write, autocast, check_writable, fail, finite, get_device, gpu_mfu,
                    npz_file, number, parse_args, random_state, set_random_state, settle, step_flops, use_compile)

# ----------------------------------------------------------------------------------------------------------
# Settings: the values of the default run, measured in docs/RESULTS.md

PHASE = 6
TEACHER = "out/phase5"   # phase 5's trained run (its ckpt.pt and vae.pt): read, never written
LATENT_SHAPE, VAE_WIDTH = [4, 16, 16], 32   # the teacher's latents of 64x64x3 flowers, and its VAE (phase 5's)
PAIRS = 3000           # (noise, the teacher's picture of it) pairs, made once into <out-dir>/pairs.pt ...
PAIR_CHUNK = 250       # ... this many at a time (a stopped run keeps every finished chunk)
TEACHER_STEPS = 25     # the teacher's Euler steps for each pair (phase 5's SAMPLE_STEPS)
STEPS = 800            # student optimizer steps
BATCH_SIZE = 128
LR = 5e-4              # peak AdamW learning rate: half of phase 5's, the student starts as the teacher
BETAS = (0.9, 0.95)    # AdamW's memories: 0.95 (not 0.999) for the gradients' scale, so a sudden large gradient
                       # meets a scale that has caught up with it, not an outsized step (a loss spike)
WARMUP_STEPS = 100     # linear warmup from 0 to LR ...
COOLDOWN = 0.3         # ... and a linear decay to 0 over the last 30% of the run
EMA_DECAY = 0.999      # samples come from an exponential moving average of the weights
T_MEAN = 0.0           # training times t = sigmoid(N(T_MEAN, 1)): most of them in the middle of the path ...
ONE_STEP_SHARE = 0.5   # ... but this share at t = 0: the one velocity that a one-step sample reads
SAMPLE_STEPS, NUM_SAMPLES = 1, 10   # the student's Euler steps from noise to data; images for each row of samples.png
CLIP_MODEL = "openai/clip-vit-base-patch32"   # the frozen text encoder (its text half)
SYNONYMS = {"common dandelion": ["dandelion"], "purple coneflower": ["echinacea"], "bird of paradise": ["strelitzia"],
            "sunflower": ["helianthus"], "water lily": ["nymphaea"]}   # for your own --data: add its names here
# How a training caption says it (each pair gets one at random): {a} "a dog", "an airplane"; {n} "dog"; {s} "dogs".
WORDINGS = ["a photo of {a}", "{n}", "{a}", "the {n}", "{s}", "a photo of the {n}", "a picture of {a}",
            "an image of {a}", "a blurry photo of {a}", "a close-up photo of {a}", "a bright photo of {a}",
            "a dark photo of the {n}", "a low resolution photo of {a}", "a photo of the small {n}", "a big {n}",
            "a photo of my {n}", "a cropped photo of the {n}", "a good photo of {a}", "a snapshot of {a}",
            "a photo of two {s}", "a photo of some {s}", "{s} in a photo", "there is {a} in this picture",
            "this is {a}", "a colour photo of {a}", "a black and white photo of {a}", "an old photo of {a}",
            "a pixelated photo of {a}", "{a}, outdoors", "a photo showing {a}", "the {n} in the photo"]
FLOWERS = ["sunflower", "rose", "daffodil", "water lily", "purple coneflower", "tiger lily", "hibiscus",
           "bird of paradise"]   # default prompts (for your own --data: its first eight classes)
CFG_SCALE = 10.0       # the teacher's guidance scale s for the pairs (phase 5's): the student learns the guided flow
CFG_FROM, CFG_UNTIL = 0.3, 0.8   # ... for CFG_FROM <= t < CFG_UNTIL; the plain conditional prediction elsewhere
ATTENTION_TIMES = [0.0]   # columns of attention.png: the points on the path where it looks (one step: only t = 0)
CKPT_EVERY = 200       # also save a checkpoint (and a row of progress.png) every this many steps
COMPILE = True         # torch.compile the model on a CUDA GPU: fused kernels, several times faster (slower start)
SHARD = slice(None)    # the part of each batch this process trains on: all of it, unless torchrun starts several
STEPS_ROWS = [1, 2, 4]   # rows of steps.png, under the teacher's: the student in this many Euler steps

def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Phase 6: reflow, phase 5's flow in one step.",
                                     epilog='@FILE: more arguments from a file, one a line (or a flag and its value: '
                                     '--prompt "a red car")', fromfile_prefix_chars="@")
    parser.add_argument("--teacher", default=TEACHER, help="the --out-dir of a trained phase-5 run (read only)")
    parser.add_argument("--pairs", type=number(int), default=PAIRS, help="(noise, teacher's picture) pairs to make")
    parser.add_argument("--steps", type=number(int), default=STEPS, help="student optimizer steps")
    parser.add_argument("--max-minutes", type=number(float), help="stop training the flow after this much wall time")
    parser.add_argument("--batch-size", type=number(int), help=f"default {BATCH_SIZE}, or the checkpoint's")
    parser.add_argument("--lr", type=number(float), help=f"peak learning rate (default {LR:g}, or the checkpoint's)")
    parser.add_argument("--prompt", action="append", help='what to draw (repeatable); default: "a photo of a {class}"')
    parser.add_argument("--num-samples", type=number(int), default=NUM_SAMPLES, help="how many images of each prompt")
    parser.add_argument("--sample-steps", type=number(int), default=SAMPLE_STEPS, help="Euler steps from noise to data")
    parser.add_argument("--cfg-scale", type=number(float, 0, True), default=CFG_SCALE, help="the teacher's CFG scale")
    parser.add_argument("--interactive", action="store_true", help="read prompts from the terminal, a picture each")
    parser.add_argument("--resume", action="store_true", help="train <out-dir>/ckpt.pt further, up to --steps")
    parser.add_argument("--save-npz", metavar="PATH", type=npz_file, help="also save the samples as uint8 arrays")
    parser.add_argument("--clip-model", help="Hugging Face name or folder of a CLIP (default: the teacher's)")
    parser.add_argument("--out-dir", default="out/phase6", help="pairs, checkpoint, pictures and metrics go here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="bf16 autocast or fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on "
                        "CUDA only; --no-compile for old GPUs, or Windows without triton)")
    parser.add_argument("--seed", type=number(int, 0, True, 2**64), default=0)
    args = parse_args(parser, argv)
    if not all(prompt.strip() for prompt in args.prompt or ["ok"]):
        parser.error('empty --prompt: say what to draw, e.g. --prompt "a photo of a dog"')
    return args


# ----------------------------------------------------------------------------------------------------------
# The teacher's VAE: pixels <-> latents (trained by phase 5; phase 6 only decodes)

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


class PairData(ImageData):
    """The teacher's pairs: its pictures (normalised latents) in `images`, the noise each one began as in `noise`,
    the caption row it was drawn for in `labels`. A batch is (noise, picture) stacked, and the caption rows."""

    def __init__(self, noise, images, labels, classes):
        super().__init__(images, labels, classes)
        self.noise = noise

    def random_batch(self, batch_size, flip=False):  # never mirrored: a mirrored noise is not the pair's noise
        idx = torch.randint(len(self.images), (batch_size,), device=self.images.device)
        return torch.stack([self.noise[idx], self.images[idx]]), self.labels[idx]


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


def text_conditional_loss(model, x0, x1, text, mask, t_mean=0.0):
    """Flow-matching loss for v(x_t, t, text) on the line from the noise x0 to the teacher's picture of it, x1 (not a
    random noise: that is reflow). No caption is dropped: the student learns the guided flow, and needs no CFG."""
    t = sample_t(len(x1), x1.device, t_mean)
    t = torch.where(torch.rand(len(x1), device=x1.device) < ONE_STEP_SHARE, 0.0, t)
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

    def draw(self, labels, u):
        """The row of a caption of each label's class, as phase 5 draws them: u in [0, 1) picks which one."""
        return self.first[labels] + (u * self.count[labels]).long()

    def loss(self, model, pairs, ids):
        """Flow matching on the line of each (noise, picture) pair, with the caption it was drawn for."""
        return text_conditional_loss(model, pairs[0], pairs[1], self.text[ids], self.mask[ids], T_MEAN)


def train(args, model, ema, opt, data, amp, step, save, trainer):
    """Train until --steps or --max-minutes; `save(step)` checkpoints periodically, at the end and on Ctrl-C."""

    def batch_loss():  # a random batch through the model: the lines of this loop that the later phases change
        pairs, ids = data.random_batch(args.batch_size)  # (noise, the teacher's picture of it), caption rows
        with amp:  # forward pass in bf16 where it is fast (see common.autocast); the loss in fp32
            return trainer.loss(model, pairs, ids)

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


def generate(args, model, teacher, table, words, vae, config, device, amp):
    """Sample --num-samples per prompt with the student; write samples.png, steps.png (the teacher's picture beside
    the student's), attention.png and (optionally) the npz. `words`: each prompt's tokens, for attention.png."""
    gen, t0 = torch.Generator().manual_seed(args.seed), time.time()
    with amp:  # x stays fp32: x + dt * v promotes the bf16 velocity
        latents, ids = sample_text_conditional(model, table, args.num_samples, 1, args.sample_steps, gen)
        images = decode(vae, latents.to(device), config["latent_scale"]).cpu()   # latents -> pictures
    seconds = time.time() - t0
    cols = min(args.num_samples, 10)  # grid: one row per prompt, up to 10 samples each
    save_grid(images.view(len(args.prompt), args.num_samples, *images.shape[1:])[:, :cols].flatten(0, 1),
              os.path.join(args.out_dir, "samples.png"), nrow=cols, titles=args.prompt)
    # Two more pictures, from one noise per prompt: the teacher's guided 25 steps beside the student's 1, 2 and 4
    # (what reflow bought), and which words each patch reads while the student draws.
    rows = ids[::args.num_samples][:16].to(device)  # one per prompt, of the first 16 (thousands would not fit)
    noise, prompts = torch.randn(len(rows), *LATENT_SHAPE, generator=gen).to(device), args.prompt[:len(rows)]
    with amp:
        x, traj, maps = sample_with_attention(model, rows, 1, args.sample_steps, noise, table, ATTENTION_TIMES)
        by_steps = [sample_conditional(teacher, rows, args.cfg_scale, TEACHER_STEPS, noise, table)[0]] + [
            sample_conditional(model, rows, 1, n, noise, table)[0] for n in STEPS_ROWS]
        (x,), traj, by_steps = ([decode(vae, x, config["latent_scale"]) for x in xs]  # latents -> pictures
                                for xs in ([x], traj, by_steps))
    save_grid(torch.cat(by_steps), os.path.join(args.out_dir, "steps.png"), nrow=len(noise),
              titles=[f"teacher: {TEACHER_STEPS} steps, CFG {args.cfg_scale:g}"]
              + [f"student: {n} step" + "s" * (n > 1) for n in STEPS_ROWS])
    save_attention(os.path.join(args.out_dir, "attention.png"), x, traj, maps, prompts, words[:len(rows)])
    if args.save_npz:  # for an evaluation: uint8, (N, H, W) grey or (N, H, W, 3) RGB
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).squeeze(-1).numpy()
        named = np.array([class_of_prompt(prompt, config["classes"]) for prompt in args.prompt])  # -1: no class named
        atomic_write(args.save_npz, lambda f: np.savez_compressed(f, images=uint8, labels=named[ids.numpy()]))
    print(f"sampled {len(images)} images in {seconds:.1f}s ({args.sample_steps} Euler step"
          f"{'s' * (args.sample_steps > 1)}, one network call each) -> {args.out_dir}"
          + (f" and {args.save_npz}" if args.save_npz else ""), flush=True)


def interactive(args, model, encoder, vae, config, device, amp):
    """Prompts from the terminal, one after another, each drawn at once into <out-dir>/prompts/NNN.png (CLIP and the
    model stay loaded: the time printed is the prompt's own). An empty line, Ctrl-D or Ctrl-C ends."""
    folder, gen = os.path.join(args.out_dir, "prompts"), torch.Generator().manual_seed(args.seed)
    os.makedirs(folder, exist_ok=True)
    print("type what to draw and press Enter (an empty line ends)", flush=True)
    for k in range(1, 10**6):
        try:
            prompt = " ".join(input("prompt> ").split())
        except (EOFError, KeyboardInterrupt):
            break
        if not prompt:
            break
        t0 = time.time()
        try:
            table = encoder.encode([prompt, ""])
        except SystemExit as e:  # too long for CLIP: say so, and ask again
            print(e, file=sys.stderr, flush=True)
            continue
        noise = torch.randn(args.num_samples, *LATENT_SHAPE, generator=gen).to(device)
        with amp:
            x, _ = sample_conditional(model, torch.zeros(args.num_samples, dtype=torch.long, device=device), 1,
                                      args.sample_steps, noise, table)
            images = decode(vae, x, config["latent_scale"]).cpu()
        path = os.path.join(folder, f"{k:03d}.png")
        save_grid(images, path, nrow=min(args.num_samples, 10), titles=[prompt])
        print(f"{path} in {time.time() - t0:.2f} s", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Main: the teacher (phase 5's run), its pairs (made if missing), the student (trained if missing, or --resume)

def setup_torchrun(args, device):
    """Past one device: `torchrun --nproc_per_node N phase6_reflow.py` starts N copies of this script. They all
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
        if (args.batch_size or BATCH_SIZE) % dist.get_world_size():
            fail(f"{dist.get_world_size()} processes cannot share --batch-size {args.batch_size or BATCH_SIZE} equally")
    first = SHARD.start in (None, 0)
    sys.stdout = sys.stdout if first else open(os.devnull, "w")
    return device, first


def load_teacher(args, device):
    """Phase 5's run in --teacher: its flow (the EMA weights: the teacher, and where the student starts), its VAE
    (it decodes), its config (the model's shape, classes, latent scale, CLIP) and its step. Read, never written."""
    how = f"train it with: python phase5_latent.py --out-dir {args.teacher}"
    paths = [os.path.join(args.teacher, name) for name in ("ckpt.pt", "vae.pt")]
    if not all(os.path.exists(path) for path in paths):
        fail(f"no trained phase-5 run in {args.teacher!r} (it needs ckpt.pt and vae.pt): {how}")
    state, vae_state = (load_checkpoint(path, 5, how) for path in paths)
    if not os.path.exists(os.path.join(args.teacher, "metrics.json")):  # phase 5 writes it when its training ends
        print(f"warning: the teacher stopped at step {state['step']} before the end of its training: {how} --resume",
              file=sys.stderr, flush=True)
    config = state["config"]
    teacher = TextConditionalDiT(LATENT_SHAPE, config["patch_size"], config["depth"], config["width"], config["heads"],
                                 config["text_dim"]).to(device)
    vae = VAE(VAE_WIDTH, LATENT_SHAPE[0]).to(device)
    restore(paths[0], state, {"ema": teacher})
    restore(paths[1], vae_state, {"ema": vae})
    return teacher.requires_grad_(False), vae.requires_grad_(False), config, state["step"]


def make_pairs(args, teacher, trainer, path, recipe, first, amp):
    """The teacher's pairs: noises z and its guided picture x1 of each (25 Euler steps at its CFG scale), for a
    caption drawn as phase 5 draws them (a random flower, then one of its captions). Made PAIR_CHUNK at a time
    from one seeded generator and saved after each chunk: a stopped run goes on with the pairs it has, and makes
    the same ones a whole run would. `recipe` (teacher, scale, steps, seed) must match the file's."""
    chunks = []
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            chunks, old = saved["chunks"], saved["recipe"]
        except Exception as e:  # noqa: BLE001
            fail(f"{path} is unreadable ({type(e).__name__}): delete it (its pairs are made again)")
        if old != recipe:
            changed = ", ".join(f"{key} {old.get(key)!r}, not {value!r}" for key, value in recipe.items()
                                if old.get(key) != value)
            fail(f"{path} holds pairs of another teacher or setting ({changed}): delete it, or use another --out-dir")
    gen, device, t0 = torch.Generator().manual_seed(args.seed), teacher.pos_embed.device, time.time()
    total, made = math.ceil(args.pairs / PAIR_CHUNK), len(chunks)
    for k in range(total):
        classes = torch.randint(len(trainer.count), (PAIR_CHUNK,), generator=gen)  # the CPU's numbers: the same
        u, noise = torch.rand(PAIR_CHUNK, generator=gen), torch.randn(PAIR_CHUNK, *LATENT_SHAPE, generator=gen)
        if k < len(chunks):  # made by an earlier, stopped run (its random numbers are drawn all the same)
            continue
        ids = trainer.draw(classes.to(device), u.to(device))
        with amp:
            x1, _ = sample_conditional(teacher, ids, args.cfg_scale, TEACHER_STEPS, noise.to(device),
                                       (trainer.text, trainer.mask))
        chunks.append({"noise": noise, "latents": x1.float().cpu(), "ids": ids.cpu()})
        if first:
            atomic_write(path, lambda f: torch.save({"recipe": recipe, "chunks": chunks}, f))
        rate = (k + 1 - made) * PAIR_CHUNK / (time.time() - t0)
        print(f"pairs {(k + 1) * PAIR_CHUNK}/{total * PAIR_CHUNK} | {rate:.1f} pairs/s | "
              f"ETA {(total - k - 1) * PAIR_CHUNK / rate / 60:.1f} min", flush=True)
    pairs = {key: torch.cat([chunk[key] for chunk in chunks]).to(device) for key in ("noise", "latents", "ids")}
    return PairData(pairs["noise"], pairs["latents"], pairs["ids"], trainer.captions)


def main(argv=None):
    args = get_args(argv)
    signal.signal(signal.SIGTERM, Terminated.handler)  # a kill (a cluster's preemption) saves, then stops
    device, first = setup_torchrun(args, get_device(args.device))

    def wrap(model):  # what train() runs: with several processes, DDP around the model, averaging the gradients
        return DDP(model, [device.index] if device.type == "cuda" else None) if dist.is_initialized() else model
    amp = autocast(device, args.precision)
    torch.manual_seed(args.seed)
    if os.path.abspath(args.teacher) == os.path.abspath(args.out_dir):
        fail(f"--out-dir {args.out_dir!r} is the teacher's folder: phase 6 writes its own ckpt.pt, choose another")
    if first:
        check_writable(args.out_dir, args.save_npz)
    ckpt_path, pairs_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "pairs.pt")
    state = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
    if state is None and args.resume:
        fail(f"no checkpoint at {ckpt_path} to resume: train first (without --resume), or fix --out-dir")
    training = state is None or (args.resume and state["step"] < args.steps)
    compile_now = use_compile(args.compile, COMPILE, device)
    teacher, vae, teacher_config, teacher_step = load_teacher(args, device)
    metrics = {}

    # The student: the teacher's model, started from its weights. Its config is the teacher's, and where it is.
    config = state["config"] if state else {**{key: value for key, value in teacher_config.items()
                                               if key not in ("batch_size", "lr")},
                                            "teacher": os.path.abspath(args.teacher), "teacher_step": teacher_step}
    settle(args, config, {"batch_size": BATCH_SIZE, "lr": LR})  # a resume trains on as its run began
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
    model.load_state_dict(teacher.state_dict())  # the student starts as the teacher
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
    if compile_now:
        for module in (model, ema, teacher):
            module.compile()

    if training:
        trainer = TextConditionalTrainer(encoder, config["classes"])
        recipe = {"teacher": config["teacher"], "teacher_step": teacher_step, "cfg_scale": args.cfg_scale,
                  "teacher_steps": TEACHER_STEPS, "seed": args.seed}
        print(f"the teacher's pairs: {args.pairs} noises, each through {TEACHER_STEPS} guided Euler steps "
              f"(kept in {pairs_path})", flush=True)
        pairs = make_pairs(args, teacher, trainer, pairs_path, recipe, first, amp)
        config["pairs"] = len(pairs.images)
        print("the student: straight lines between the pairs", flush=True)
        noise = torch.randn(8, *LATENT_SHAPE, generator=torch.Generator().manual_seed(args.seed)).to(device)

        def save(s):  # a checkpoint, and a row of progress.png: the same 8 noises, "a photo of" the first 8 classes
            if not first:
                return
            first8 = torch.arange(8, device=device) % len(config["classes"])  # (your --data may have fewer)
            with amp:
                x, _ = sample_conditional(ema, trainer.first[first8], 1, args.sample_steps, noise,
                                          (trainer.text, trainer.mask))
            row = (s, decode(vae, x, config["latent_scale"]).cpu())
            save_checkpoint(ckpt_path, model, ema, opt, s, config, {"progress": progress + [row]})
            progress.append(row)  # the picture shows only what is on disk
            save_grid(torch.cat([x for _, x in progress]), os.path.join(args.out_dir, "progress.png"), nrow=8,
                      titles=[f"step {s}" for s, _ in progress])
        metrics.update(train(args, wrap(model), ema, opt, pairs, amp, step, save, trainer))
    if dist.is_initialized():  # training is over: copy 0 alone samples
        dist.destroy_process_group()
        if not first:
            return
    if training:  # before sampling: an interrupt there keeps them (and sampling again never rewrites them)
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
            json.dump({"config": config, **metrics}, f, indent=2)
    if args.interactive:
        interactive(args, ema, encoder, vae, config, device, amp)
    else:
        generate(args, ema, teacher, table, [encoder.words(prompt) for prompt in args.prompt], vae, config, device,
                 amp)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside training (loading data, sampling): nothing to save
        fail("interrupted")
