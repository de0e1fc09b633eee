"""
Phase 3 — "draw me a 7": class conditioning and classifier-free guidance (CFG), on the phase-2 DiT.

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

New in this phase: the digit y. A learned embedding of y is added to the time embedding, so adaLN now carries
both "how noisy" and "which digit": the network learns v(x_t, t, y). During training the label is replaced by a
null class (index 10) 10% of the time, so the same network also learns the unconditional v(x_t, t, null).
At sampling, classifier-free guidance pushes away from the unconditional prediction (Ho & Salimans, 2022):

    v = v_uncond + s * (v_cond - v_uncond)       s = 1: plain conditional; s > 1: more "7-like" than a 7

It is the extrapolation of phases 1-2 (autoguidance, away from an early copy of the model) with another guide:
the model's own unconditional prediction. No copy to keep, and the push goes towards the digit asked for.

Run:
    python phase3_cfg.py                                  # train (default 4,000 steps), then sample
    python phase3_cfg.py --sample-only --digit 7 --cfg-scale 5   # ten 7s from out/phase3/ckpt.pt
    python phase3_cfg.py --max-minutes 5                  # stop training after 5 minutes, whatever the step
    python phase3_cfg.py --sample-only --num-samples 100  # sample from out/phase3/ckpt.pt
    python phase3_cfg.py --data-root ../shared/data       # offline: use a local copy of MNIST
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

from common import autocast, fail, get_device, load_dataset


# ----------------------------------------------------------------------------------------------------------
# Settings

NUM_CLASSES = 10          # digits 0..9; index 10 is the "null" class: no label
CFG_SCALE = 5.0           # default guidance scale: accuracy 0.998 (README table for 1, 3, 5, 7)
SWEEP_SCALES = [1, 2, 3, 5, 7]   # rows of cfg_sweep.png


def parse_digits(text):
    """'7' or '3,5' -> [7] or [3, 5]; anything outside 0..9 is an error."""
    try:
        digits = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a digit") from None
    if not digits or any(not 0 <= d < NUM_CLASSES for d in digits):
        raise argparse.ArgumentTypeError(f"{text!r}: digits are 0..9")
    return digits


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Phase 3: class-conditional flow matching on MNIST with CFG.")
    g = p.add_argument_group("training")
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
    g.add_argument("--label-dropout", type=float, default=0.1,
                   help="probability of replacing a label by the null class (trains the unconditional model)")
    g = p.add_argument_group("model")
    g.add_argument("--patch-size", type=int, default=4,
                   help="pixels per patch side; must divide 28 (phase 2 uses 7; this phase was measured at 4)")
    g.add_argument("--depth", type=int, default=6, help="transformer blocks")
    g.add_argument("--width", type=int, default=128, help="token vector size")
    g.add_argument("--heads", type=int, default=4, help="attention heads (must divide --width)")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample-only", action="store_true", help="skip training, sample from <out-dir>/ckpt.pt")
    g.add_argument("--digit", type=parse_digits, action="extend", metavar="D",
                   help="digit(s) to draw: --digit 7, --digit 3,5 or --digit 3 --digit 5 (default: all ten)")
    g.add_argument("--cfg-scale", type=float, default=CFG_SCALE, help="guidance scale s (1 = no guidance)")
    g.add_argument("--num-samples", type=int, default=10, help="how many images per requested digit")
    g.add_argument("--sample-steps", type=int, default=25,
                   help="Euler steps from noise to data (in the phase-4 benchmark 25 scored as well as 50)")
    g.add_argument("--save-npz", metavar="PATH", help="also save the samples as uint8 arrays for scoring")
    g = p.add_argument_group("I/O and system")
    g.add_argument("--data-root", default="data", help="where MNIST is, or is downloaded to")
    g.add_argument("--out-dir", default="out/phase3", help="samples, trajectory, checkpoint and metrics go here")
    g.add_argument("--resume", action="store_true", help="continue training from <out-dir>/ckpt.pt")
    g.add_argument("--ckpt-every", type=int, default=1000, help="also save a checkpoint every this many steps")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast where the hardware is fast at it (auto), or force one")
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "num_samples", "sample_steps", "patch_size", "depth", "width", "heads",
                 "ckpt_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.lr <= 0 or (args.max_minutes is not None and args.max_minutes <= 0) or not 0 <= args.ema_decay < 1:
        p.error("--lr and --max-minutes must be positive and --ema-decay in [0, 1)")
    if not 0 <= args.cooldown <= 1:
        p.error("--cooldown must be a fraction in [0, 1]")
    if 28 % args.patch_size:
        p.error(f"--patch-size {args.patch_size} does not divide the 28x28 image (try 2, 4, 7 or 14)")
    if args.width % args.heads or (args.width // args.heads) % 2:
        p.error("--width must be divisible by --heads, with an even size per head")
    if args.width % 4:
        p.error("--width must be a multiple of 4 (the 2-D position code splits it in four)")
    if args.cfg_scale < 0:
        p.error("--cfg-scale must be >= 0 (0 = unconditional, 1 = conditional, > 1 = guided)")
    if not 0 <= args.label_dropout < 1:
        p.error("--label-dropout must be in [0, 1)")
    args.digit = sorted(set(args.digit)) if args.digit else list(range(NUM_CLASSES))
    if args.sample_only and args.resume:
        p.error("--sample-only and --resume cannot be used together")
    return args


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


### Class embedding ###

class ClassEmbedding(nn.Module):
    """One learned vector per digit, plus one for the null class (index 10) that means 'no label given'."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):                                                  # y: (B,) in 0..num_classes
        return self.table(y)                                               # (B, dim)


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


class ConditionalDiT(nn.Module):
    """patchify -> linear embed + 2-D positions -> DiT blocks conditioned on (t, y) -> final layer -> unpatchify."""

    def __init__(self, image_shape=(1, 28, 28), patch_size=4, depth=6, width=128, heads=4, num_classes=10):
        super().__init__()
        self.image_shape, self.patch_size = tuple(image_shape), patch_size
        C, H, W = self.image_shape
        patch_dim = patch_size * patch_size * C
        self.patch_embed = nn.Linear(patch_dim, width)
        self.register_buffer("pos_embed", sincos_2d(width, H // patch_size, W // patch_size))  # (N, D), fixed
        self.time_embed = TimeEmbedding(width)
        self.class_embed = ClassEmbedding(num_classes, width)
        self.blocks = nn.ModuleList([DiTBlock(width, heads) for _ in range(depth)])
        self.final = FinalLayer(width, patch_dim)
        self.initialize_weights()

    def initialize_weights(self):
        # Plain Xavier for every linear layer, zero biases; small normal class embeddings, as in DiT.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_embed.table.weight, std=0.02)
        # adaLN-Zero: the modulation layers start at zero, so every gate is 0 and every block is exactly the
        # identity at step 0. A deep stack then starts as a shallow, well-behaved network and each block learns
        # how much to contribute; DiT found this trains faster and more stably than any other conditioning.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        # The output layer starts at zero too: the model first predicts v = 0, a calm start for the loss.
        for layer in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):                                       # x: (B, C, H, W), t: (B,), y: (B,)
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed   # (B, N, D)
        c = self.time_embed(t) + self.class_embed(y)                  # (B, D): "how noisy" + "which digit"
        for block in self.blocks:
            tokens = block(tokens, c)                                 # (B, N, D)
        patches = self.final(tokens, c)                               # (B, N, p*p*C)
        return unpatchify(patches, self.patch_size, *self.image_shape)  # velocity, like x


def build_model(config):
    return ConditionalDiT(config["image_shape"], config["patch_size"], config["depth"], config["width"],
                          config["heads"], NUM_CLASSES)


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


def get_conditional_loss(model, x1, y, label_dropout=0.1, t_sampling="logit-normal", t_mean=0.0):
    """Flow-matching loss for v(x_t, t, y), where each label becomes the null class with prob. label_dropout.

    Why this gives the unconditional model for free: for a dropped sample the network sees no label, so the best
    it can do is predict the velocity averaged over all digits, which is exactly v(x_t, t) of phase 2. One
    network, one training run, both predictions that CFG needs."""
    x0 = torch.randn_like(x1)                                  # noise
    t = sample_t(len(x1), t_sampling, x1.device, t_mean)
    xt, target = interpolate(x0, x1, t)
    drop = torch.rand(len(y), device=y.device) < label_dropout
    y = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)  # per sample: label or null (index 10)
    return F.mse_loss(model(xt, t, y), target)


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


def guided_velocity(model, x, t, y, cfg_scale):
    """v_uncond + s * (v_cond - v_uncond), both predictions from ONE forward pass over a doubled batch."""
    null = torch.full_like(y, NUM_CLASSES)
    if cfg_scale == 1:
        return model(x, t, y)      # s = 1 is the conditional prediction: skip the unconditional half
    if cfg_scale == 0:
        return model(x, t, null)   # s = 0 is the unconditional prediction
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def sample_conditional(model, labels, cfg_scale, steps, noise=None, keep_every=None):
    """Euler sampling of images of the given labels (B,), guided with scale cfg_scale; noise defaults to N(0, I)."""
    if noise is None:
        noise = torch.randn(len(labels), *model.image_shape, device=labels.device)
    return euler_sample(lambda x, t: guided_velocity(model, x, t, labels, cfg_scale), noise, steps, keep_every)


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


def train(args, config, device, amp, model, ema, opt, step, data):
    """Train until --steps or --max-minutes; checkpoints periodically, at the end, and on Ctrl-C."""
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
            x1, y = data.random_batch(args.batch_size)
            with amp:  # forward pass in bf16 where it is fast (see common.autocast); the loss is computed in fp32
                loss = get_conditional_loss(model, x1, y, args.label_dropout, args.t_sampling, args.t_mean)
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
# Outputs: a row per digit, trajectory strip, CFG sweep, arrays for scoring

def to_uint8(x):
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, H, W) for grey or (N, H, W, 3) for RGB."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


@torch.no_grad()
def sample_each_class(model, digits, per_digit, cfg_scale, steps, generator=None, batch=500):
    """per_digit images of each digit, digit-major (all the first digit's, then the next...): grid rows = digits.

    Returns images (len(digits) * per_digit, C, H, W) and their labels."""
    device = next(model.parameters()).device
    labels = torch.tensor(digits, device=device).repeat_interleave(per_digit)
    noise = torch.randn(len(labels), *model.image_shape, generator=generator).to(device)
    images = [sample_conditional(model, labels[i:i + batch], cfg_scale, steps, noise[i:i + batch])[0]
              for i in range(0, len(labels), batch)]  # in chunks, so 1,000 samples fit in a laptop's memory
    return torch.cat(images), labels


def save_grid(images, path, nrow):
    save_image((images.clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=1)


def generate(args, model, device, amp, image_shape):
    """Sample --num-samples per digit; write samples.png, trajectory.png, cfg_sweep.png and (optionally) the npz."""
    gen = torch.Generator().manual_seed(args.seed)  # noise drawn on the CPU: the same images on every device
    t0 = time.time()
    with amp:  # x stays fp32: x + dt * v promotes the bf16 velocity
        images, labels = sample_each_class(model, args.digit, args.num_samples, args.cfg_scale, args.sample_steps,
                                           gen)
    seconds = time.time() - t0
    images = images.cpu()
    cols = min(args.num_samples, 10)   # grid: one row per digit, up to 10 samples each
    save_grid(images.view(len(args.digit), args.num_samples, *image_shape)[:, :cols].flatten(0, 1),
              os.path.join(args.out_dir, "samples.png"), nrow=cols)

    # Two pictures from one noise per digit: how noise becomes a digit, and what the guidance scale does.
    digits = torch.tensor(args.digit, device=device)
    noise = torch.randn(len(digits), *image_shape, generator=gen).to(device)
    with amp:
        _, traj = sample_conditional(model, digits, args.cfg_scale, args.sample_steps, noise,
                                     keep_every=max(1, args.sample_steps // 8))
        sweep = [sample_conditional(model, digits, s, args.sample_steps, noise)[0] for s in SWEEP_SCALES]
    strip = torch.stack([xt.cpu() for xt in traj], dim=1).flatten(0, 1)  # rows = digits, columns = t from 0 to 1
    save_grid(strip, os.path.join(args.out_dir, "trajectory.png"), nrow=len(traj))
    save_grid(torch.cat(sweep).cpu(), os.path.join(args.out_dir, "cfg_sweep.png"), nrow=len(digits))

    if args.save_npz:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_npz)), exist_ok=True)
        np.savez_compressed(args.save_npz, images=to_uint8(images), labels=labels.cpu().numpy())
    print(f"sampled {len(images)} images in {seconds:.1f}s ({args.sample_steps} Euler steps, CFG scale "
          f"{args.cfg_scale}) -> {args.out_dir}" + (f" and {args.save_npz}" if args.save_npz else ""), flush=True)
    return {"num_samples": len(images), "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale,
            "sample_seconds": round(seconds, 1)}


# ----------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    args = get_args(argv)
    device = get_device(args.device)
    amp = autocast(device, args.precision)
    if device.type == "cpu":  # PyTorch's fused CPU attention trains ~2x slower here than its plain-matmul version;
        torch.backends.cuda.enable_flash_sdp(False)  # despite the name, this flag also switches the CPU kernel
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    run_start = time.time()

    config = {"image_shape": [1, 28, 28], "patch_size": args.patch_size, "depth": args.depth, "width": args.width,
              "heads": args.heads}
    state = None
    if args.sample_only or args.resume:
        state = load_checkpoint(ckpt_path, device)
        config = state["config"]  # the model is rebuilt exactly as it was trained
    model = build_model(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, metrics = 0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        torch.set_rng_state(state["rng"].cpu())  # resume draws the same batches as an uninterrupted run
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        print(f"loaded {ckpt_path} (step {step})", flush=True)

    if not args.sample_only:
        data = load_dataset("mnist", args.data_root, train=True).to(device)
        metrics.update(train(args, config, device, amp, model, ema, opt, step, data))

    ema.eval()
    metrics.update(generate(args, ema, device, amp, config["image_shape"]))
    metrics["wall_seconds"] = round(time.time() - run_start, 1)
    if not args.sample_only:
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
            json.dump({"config": config, **metrics}, f, indent=2)


if __name__ == "__main__":
    main()
