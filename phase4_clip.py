"""
Phase 4 — "a photo of a dog": text prompts through a frozen CLIP text encoder and cross-attention, on CIFAR-10.

New in this phase: the condition is text. A frozen CLIP text encoder turns a prompt into one vector per token;
in every block, after self-attention, the image tokens read the text tokens through cross-attention (queries from
the image, keys and values from the text), as in Stable Diffusion and PixArt; the prompt's last token, which has
read all of it, also joins t in adaLN, as in SD3. The "null" condition of CFG is the empty prompt "". Training
captions name the class in many wordings and by several names ("a photo of a dog", "two puppies"), so the model
learns from the words, not from a few fixed strings.

From phases 1-3: flow matching trains a network v(x_t, t) on the straight path x_t = (1 - t) x0 + t x1 from noise
x0 (t = 0) to data x1 (t = 1), with the loss || v(x_t, t) - (x1 - x0) ||^2, and samples by Euler steps x += dt * v
from noise. The network is a DiT (patches as tokens, t through adaLN); classifier-free guidance samples with
v = v_uncond + s * (v_cond - v_uncond), both from one network trained with the condition sometimes dropped.

Run:
    python phase4_clip.py --prompt "a photo of a dog"    # train first if out/phase4 has no checkpoint, then draw
    python phase4_clip.py --prompt "a photo of a cat" --prompt "a photo of a ship" --cfg-scale 4
    python phase4_clip.py --resume --steps 8000          # train the same model further
    python phase4_clip.py --clip-model path/to/clip      # a CLIP saved on disk (offline)
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
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from common import (Terminated, atomic_write, autocast, check_same_data, check_writable, fail, finite, get_device,
                    gpu_mfu, load_dataset, note_ignored, npz_file, number, parse_args, random_state, set_random_state,
                    settle, step_flops, use_compile)

# ----------------------------------------------------------------------------------------------------------
# Settings: the values of the default run, measured in docs/RESULTS.md

PHASE = 4
DATASET, IMAGE_SHAPE = "cifar10", [3, 32, 32]
STEPS = 5600           # optimizer steps of the default run (2,800 draw the right class, twice that draws it varied)
BATCH_SIZE = 128
LR = 1e-3              # peak AdamW learning rate
BETAS = (0.9, 0.95)    # AdamW's memories: 0.95 (not 0.999) for the gradients' scale, so a sudden large gradient
                       # meets a scale that has caught up with it, not an outsized step (a loss spike)
WARMUP_STEPS = 200     # linear warmup from 0 to LR ...
COOLDOWN = 0.3         # ... and a linear decay to 0 over the last 30% of the run
EMA_DECAY = 0.999      # samples come from an exponential moving average of the weights
T_MEAN = 0.0           # training times t = sigmoid(N(T_MEAN, 1)): most of them in the middle of the path
PATCH_SIZE = 4         # 4x4-pixel patches: 64 tokens
DEPTH, WIDTH, HEADS = 6, 192, 4   # transformer blocks, token vector size, attention heads
SAMPLE_STEPS, NUM_SAMPLES = 25, 10   # Euler steps from noise to data; images drawn for each row of samples.png
CLIP_MODEL = "openai/clip-vit-base-patch32"   # the frozen text encoder (its text half)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SYNONYMS = {"airplane": ["plane", "aeroplane", "jet", "airliner"], "automobile": ["car", "sedan", "sports car"],
            "bird": ["sparrow", "songbird"], "cat": ["kitten", "kitty"], "deer": ["stag", "fawn"],
            "dog": ["puppy", "pup", "hound"], "frog": ["toad", "tree frog"], "horse": ["pony", "stallion", "foal"],
            "ship": ["boat", "vessel", "cargo ship"], "truck": ["lorry", "pickup truck", "dump truck"]}
# How a training caption says it (each image gets one at random): {a} "a dog", "an airplane"; {n} "dog"; {s} "dogs".
WORDINGS = ["a photo of {a}", "{n}", "{a}", "the {n}", "{s}", "a photo of the {n}", "a picture of {a}",
            "an image of {a}", "a blurry photo of {a}", "a close-up photo of {a}", "a bright photo of {a}",
            "a dark photo of the {n}", "a low resolution photo of {a}", "a photo of the small {n}", "a big {n}",
            "a photo of my {n}", "a cropped photo of the {n}", "a good photo of {a}", "a snapshot of {a}",
            "a photo of two {s}", "a photo of some {s}", "{s} in a photo", "there is {a} in this picture",
            "this is {a}", "a colour photo of {a}", "a black and white photo of {a}", "an old photo of {a}",
            "a pixelated photo of {a}", "{a}, outdoors", "a photo showing {a}", "the {n} in the photo"]
CAPTION_DROPOUT = 0.1  # how often a training caption becomes "" (that trains the unconditional model)
CFG_SCALE = 6.5        # classifier-free guidance scale s (1 = off) ...
CFG_FROM, CFG_UNTIL = 0.5, 1.0   # ... for CFG_FROM <= t < CFG_UNTIL; the plain conditional prediction elsewhere
SWEEP_SCALES = [1, 3, 6, 9, 12]  # rows of cfg_sweep.png; then --cfg-scale on the whole path (what the interval does)
ATTENTION_TIMES = [0.2, 0.5, 0.8]   # columns of attention.png: the points on the path where it looks
CKPT_EVERY = 500       # also save a checkpoint (and a row of progress.png) every this many steps
COMPILE = True         # torch.compile the model on a CUDA GPU: fused kernels, several times faster (slower start)
STEPS_ROWS = [1, 2, 4, 8, 16, 50]   # rows of steps.png: the same noise, integrated in this many Euler steps


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Phase 4: text-to-image flow matching on CIFAR-10 with CLIP.",
                                     epilog='@FILE: more arguments from a file, one a line (or a flag and its value: '
                                     '--prompt "a red car")', fromfile_prefix_chars="@")
    parser.add_argument("--steps", type=number(int), default=STEPS, help="optimizer steps to train for")
    parser.add_argument("--max-minutes", type=number(float), help="stop training after this much wall time")
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
    parser.add_argument("--data-root", default="data", help="where CIFAR-10 is, or is downloaded to")
    parser.add_argument("--out-dir", default="out/phase4", help="checkpoint, pictures and metrics go here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="bf16 autocast or fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on "
                        "CUDA only; --no-compile for old GPUs, or Windows without triton)")
    parser.add_argument("--seed", type=number(int, 0, True, 2**64), default=0)
    args = parse_args(parser, argv)
    if args.width % math.lcm(4, HEADS):
        parser.error(f"--width must be a multiple of {math.lcm(4, HEADS)} ({HEADS} heads; the 2-D position code "
                     "splits it in four)")
    args.prompt = args.prompt or [caption(WORDINGS[0], name) for name in CLASSES]
    if not all(prompt.strip() for prompt in args.prompt):
        parser.error('empty --prompt: say what to draw, e.g. --prompt "a photo of a dog"')
    return args


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
    return F.mse_loss(model(xt, t, text, mask), target)


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
        noise = torch.randn(len(chunk), *IMAGE_SHAPE, generator=gen).to(model.pos_embed.device)
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


def generate(args, model, table, words, device, amp):
    """Sample --num-samples per prompt; write samples.png, trajectory.png/.gif, steps.png, cfg_sweep.png,
    attention.png and (optionally) the npz. `words`: each prompt's tokens, for attention.png."""
    gen, t0 = torch.Generator().manual_seed(args.seed), time.time()
    with amp:  # x stays fp32: x + dt * v promotes the bf16 velocity
        images, ids = sample_text_conditional(model, table, args.num_samples, args.cfg_scale, args.sample_steps,
                                                 gen)
    seconds = time.time() - t0
    cols = min(args.num_samples, 10)  # grid: one row per prompt, up to 10 samples each
    save_grid(images.view(len(args.prompt), args.num_samples, *IMAGE_SHAPE)[:, :cols].flatten(0, 1),
              os.path.join(args.out_dir, "samples.png"), nrow=cols, titles=args.prompt)
    # Five more pictures, from one noise per prompt: how noise becomes a picture (a strip of 9 moments and an animation
    # of every step), fewer Euler steps, the guidance scale, and which words each patch reads (as the strip is drawn).
    rows = ids[::args.num_samples][:16].to(device)  # one per prompt, of the first 16 (thousands would not fit)
    noise, prompts = torch.randn(len(rows), *IMAGE_SHAPE, generator=gen).to(device), args.prompt[:len(rows)]
    with amp:
        x, traj, maps = sample_with_attention(model, rows, args.cfg_scale, args.sample_steps, noise, table,
                                              ATTENTION_TIMES)
        by_steps = [sample_conditional(model, rows, args.cfg_scale, n, noise, table)[0] for n in STEPS_ROWS]
        sweep = [sample_conditional(model, rows, s, args.sample_steps, noise, table)[0] for s in SWEEP_SCALES]
        sweep.append(sample_conditional(model, rows, args.cfg_scale, args.sample_steps, noise, table, (0, 1))[0])
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
        named = np.array([class_of_prompt(prompt, CLASSES) for prompt in args.prompt])  # -1: no class named
        atomic_write(args.save_npz, lambda f: np.savez_compressed(f, images=uint8, labels=named[ids.numpy()]))
    print(f"sampled {len(images)} images in {seconds:.1f}s ({args.sample_steps} Euler steps, CFG scale "
          f"{args.cfg_scale:g}) -> {args.out_dir}" + (f" and {args.save_npz}" if args.save_npz else ""), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Main: a checkpoint in --out-dir is sampled from; --resume trains it further; none: train one, then sample

def main(argv=None):
    args = get_args(argv)
    signal.signal(signal.SIGTERM, Terminated.handler)  # a kill (a cluster's preemption) saves, then stops
    device = get_device(args.device)
    amp = autocast(device, args.precision)
    torch.manual_seed(args.seed)
    check_writable(args.out_dir, args.save_npz)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    state = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
    if state is None and args.resume:
        fail(f"no checkpoint at {ckpt_path} to resume: train first (without --resume), or fix --out-dir")
    training = state is None or (args.resume and state["step"] < args.steps)

    config = state["config"] if state else {"patch_size": PATCH_SIZE, "depth": args.depth, "width": args.width,
                                            "heads": HEADS}  # a checkpoint rebuilds the model it trained
    settle(args, config, {"batch_size": BATCH_SIZE, "lr": LR})  # a resume trains on as its run began
    clip_name = args.clip_model or config.get("clip_model", CLIP_MODEL)  # --clip-model on the command line wins
    encoder = CLIPTextEncoder(clip_name, device)
    table = encoder.encode(args.prompt + [""])  # the prompts, then "" (the null condition): CLIP runs once, and
    # a prompt it cannot read stops the run now, not after training
    clip_name = os.path.abspath(clip_name) if os.path.isdir(clip_name) else clip_name  # found from anywhere
    if training and os.path.basename(config.setdefault("clip_model", clip_name)) != os.path.basename(clip_name):
        fail(f"{ckpt_path} was trained with CLIP {config['clip_model']!r}: train it further with that one (sampling "
             f"with another is fine), or use another --out-dir")
    config["clip_model"] = clip_name  # the same CLIP (a folder may have moved): its new place
    if config.setdefault("text_dim", encoder.dim) != encoder.dim:
        fail(f"{clip_name!r} gives {encoder.dim}-wide token vectors; this model was trained on {config['text_dim']}")
    model = TextConditionalDiT(IMAGE_SHAPE, config["patch_size"], config["depth"], config["width"], config["heads"],
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
        note_ignored(args, config, {"depth": DEPTH, "width": WIDTH})
    if use_compile(args.compile, COMPILE, device):
        for module in (model, ema):  # in place: the weights, and so the checkpoints, stay as they are
            module.compile()

    if training:
        data = load_dataset(DATASET, args.data_root, train=True).to(device)
        check_same_data(config, data, DATASET, ckpt_path)
        trainer = TextConditionalTrainer(encoder, data.classes)
        if step == 0:  # a new model learns its text standardisation from its training captions, once
            for module in (model, ema):
                module.text_mean.copy_(trainer.text_mean), module.text_std.copy_(trainer.text_std)
        noise = torch.randn(8, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(args.seed)).to(device)

        def save(s):  # a checkpoint, and a row of progress.png: the same 8 noises, "a photo of" the first 8 classes
            first8 = torch.arange(8, device=device) % len(data.classes)  # (a folder may have fewer)
            with amp:
                x, _ = sample_conditional(ema, trainer.first[first8], args.cfg_scale, args.sample_steps, noise,
                                          (trainer.text, trainer.mask))
            row = (s, x.cpu())
            save_checkpoint(ckpt_path, model, ema, opt, s, config, {"progress": progress + [row]})
            progress.append(row)  # the picture shows only what is on disk
            save_grid(torch.cat([x for _, x in progress]), os.path.join(args.out_dir, "progress.png"), nrow=8,
                      titles=[f"step {s}" for s, _ in progress])
        metrics = train(args, model, ema, opt, data, amp, step, save, trainer)
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:  # before sampling: an interrupt there
            json.dump({"config": config, **metrics}, f, indent=2)          # keeps them (sampling never rewrites them)
    generate(args, ema, table, [encoder.words(prompt) for prompt in args.prompt], device, amp)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside training (loading data, sampling): nothing to save
        fail("interrupted")
