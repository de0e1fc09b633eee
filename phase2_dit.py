"""
Phase 2 — the same flow matching, with a Diffusion Transformer (DiT) as the velocity network.

The idea. Take a noise image x0 ~ N(0, I) and a data image x1. Walk on the straight line between them:

    x_t = (1 - t) * x0 + t * x1,        t in [0, 1]      (t = 0 is pure noise, t = 1 is data)

Along that line the velocity is constant: dx_t/dt = x1 - x0. Train a network v(x_t, t) to predict it:

    loss = E_{x0, x1, t} || v(x_t, t) - (x1 - x0) ||^2

For one pair the target is exact; over all pairs that pass through the same x_t the network learns their
average, which is the velocity field that carries the whole noise distribution onto the data distribution.
To generate, start from noise at t = 0 and integrate dx/dt = v(x, t) to t = 1 (Euler: x += dt * v).

New in this phase: the network. The image is cut into 7x7-pixel patches (a 4x4 grid = 16 tokens), each patch becomes
a vector, a 2-D position code tells the tokens where they sit, and transformer blocks let every patch look at every
other. (4x4 patches, 49 tokens, draw finer per step but cost 2.5x per step on a CPU: in a 10-minute budget the
16-token model wins, README.)
The time t steers each block through adaLN: it sets the scale and shift of every LayerNorm (Peebles & Xie, 2023).

A better sampler for free: autoguidance (Karras et al., 2024). Keep a copy of the model from early in training;
it makes the same kinds of mistakes as the final model, only bigger. Extrapolate away from it:

    v = v_early + w * (v_final - v_early),      w > 1      (w = 1 is the plain model)

Here only for 0.1 <= t < 0.5: the middle of the path, where the digit's shape is decided (README).

Run:
    python phase2_dit.py                                  # train (default 4,000 steps), then sample
    python phase2_dit.py --max-minutes 5                  # stop training after 5 minutes, whatever the step
    python phase2_dit.py --sample-only --num-samples 100  # sample from out/phase2/ckpt.pt
    python phase2_dit.py --sample-only --guidance 1       # the same, without autoguidance
    python phase2_dit.py --data-root ../shared/data       # offline: use a local copy of MNIST
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

GUIDANCE = 10.0  # default autoguidance weight (README: the sweep over w, --guide-at and the t interval)
GUIDE_AT = 0.2   # the guide is the EMA model at 20% of the run
GUIDE_FROM = 0.1   # not the first tenth of the path, where the digit's class is picked (README)
GUIDE_UNTIL = 0.5  # nor the cleaner half: guide 0.1 <= t < 0.5, where the digit's shape is decided (README)

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Phase 2: unconditional flow matching on MNIST with a DiT.")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=4000, help="optimizer steps to train for")
    g.add_argument("--max-minutes", type=float, default=None, help="stop training after this much wall time")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=4e-3,
                   help="peak AdamW learning rate, after warmup (4e-3 beat 2e-3 in 9 minutes, README)")
    g.add_argument("--warmup-steps", type=int, default=200, help="linear learning-rate warmup")
    g.add_argument("--cooldown", type=float, default=0.3,
                   help="fraction of the run (steps or minutes, whichever ends first) with the lr decaying to 0")
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights, used for sampling")
    g.add_argument("--t-sampling", choices=["uniform", "logit-normal"], default="logit-normal",
                   help="how training times t are drawn (logit-normal puts more weight on the middle)")
    g.add_argument("--t-mean", type=float, default=-0.5,
                   help="centre of the logit-normal, in logits (-0.5 beat 0 here, README)")
    g = p.add_argument_group("model")
    g.add_argument("--patch-size", type=int, default=7, help="pixels per patch side; must divide 28 (7: 16 tokens)")
    g.add_argument("--depth", type=int, default=6, help="transformer blocks")
    g.add_argument("--width", type=int, default=128, help="token vector size")
    g.add_argument("--heads", type=int, default=4, help="attention heads (must divide --width)")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample-only", action="store_true", help="skip training, sample from <out-dir>/ckpt.pt")
    g.add_argument("--num-samples", type=int, default=64, help="how many images to generate")
    g.add_argument("--sample-steps", type=int, default=50, help="Euler steps from noise to data")
    g.add_argument("--guidance", type=float, default=GUIDANCE,
                   help="autoguidance weight w: v = v_early + w (v - v_early); 1 = off (README table)")
    g.add_argument("--guide-at", type=float, default=GUIDE_AT,
                   help="when to keep the early copy (the guide): this fraction of the run (steps or minutes)")
    g.add_argument("--guide-from", type=float, default=GUIDE_FROM,
                   help="guide only from this t on (t=0 noise, t=1 data); before it the plain model is used")
    g.add_argument("--guide-until", type=float, default=GUIDE_UNTIL,
                   help="guide only while t < this (t=0 noise, t=1 data); after it the plain model is used")
    g.add_argument("--save-npz", metavar="PATH", help="also save the samples as uint8 arrays for scoring")
    g = p.add_argument_group("I/O and system")
    g.add_argument("--data-root", default="data", help="where MNIST is, or is downloaded to")
    g.add_argument("--out-dir", default="out/phase2", help="samples, trajectory, checkpoint and metrics go here")
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
    if not 0 < args.guide_at < 1 or not 0 <= args.guide_from < args.guide_until <= 1 or args.guidance < 0:
        p.error("--guide-at must be a fraction in (0, 1), 0 <= --guide-from < --guide-until <= 1 and --guidance >= 0")
    if 28 % args.patch_size:
        p.error(f"--patch-size {args.patch_size} does not divide the 28x28 image (try 2, 4, 7 or 14)")
    if args.width % args.heads or (args.width // args.heads) % 2:
        p.error("--width must be divisible by --heads, with an even size per head")
    if args.width % 4:
        p.error("--width must be a multiple of 4 (the 2-D position code splits it in four)")
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


class DiT(nn.Module):
    """patchify -> linear embed + 2-D positions -> DiT blocks conditioned on t -> final layer -> unpatchify."""

    def __init__(self, image_shape=(1, 28, 28), patch_size=7, depth=6, width=128, heads=4):
        super().__init__()
        self.image_shape, self.patch_size = tuple(image_shape), patch_size
        C, H, W = self.image_shape
        patch_dim = patch_size * patch_size * C
        self.patch_embed = nn.Linear(patch_dim, width)
        self.register_buffer("pos_embed", sincos_2d(width, H // patch_size, W // patch_size))  # (N, D), fixed
        self.time_embed = TimeEmbedding(width)
        self.blocks = nn.ModuleList([DiTBlock(width, heads) for _ in range(depth)])
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
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        # The output layer starts at zero too: the model first predicts v = 0, a calm start for the loss.
        for layer in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t):                                          # x: (B, C, H, W), t: (B,)
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed   # (B, N, D)
        c = self.time_embed(t)                                        # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)                                 # (B, N, D)
        patches = self.final(tokens, c)                               # (B, N, p*p*C)
        return unpatchify(patches, self.patch_size, *self.image_shape)  # velocity, like x


def build_model(config):
    return DiT(config["image_shape"], config["patch_size"], config["depth"], config["width"], config["heads"])


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


def flow_matching_loss(model, x1, t_sampling="logit-normal", t_mean=0.0):
    """x1: a batch of data. The mean squared error between predicted and true velocity at random (x_t, t)."""
    x0 = torch.randn_like(x1)                                  # noise
    t = sample_t(len(x1), t_sampling, x1.device, t_mean)
    xt, target = interpolate(x0, x1, t)
    return F.mse_loss(model(xt, t), target)


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


def autoguided(model, guide, w, start=0.0, until=1.0):
    """Autoguidance: v = v_guide + w (v_model - v_guide) for start <= t < until, the guide an early copy of the model.

    Early in training the model already knows roughly where digits are but draws them badly; the difference
    between the final and the early model points the way training was improving the samples, and w > 1 goes
    further that way. Unlike sampling from less noise it keeps most of the variety (README). (Phase 3 uses the
    same formula with another guide: the model's own prediction without the class label.) Guiding only part of the
    path (Kynkaanniemi et al., 2024): the very first steps pick which digit it becomes, and guiding them makes the
    easy ones commoner; the middle decides its shape; near the data the guide only costs time (README)."""
    if w == 1:
        return model

    def velocity(x, t):
        v = model(x, t)
        if not start <= t[0] < until:  # the sampler moves the whole batch with one t; outside, no guide is run
            return v
        v_guide = guide(x, t)
        return v_guide + w * (v - v_guide)
    return velocity


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one file with everything needed to resume or to sample

def save_checkpoint(path, model, ema, opt, step, config, smooth_loss, guide, guide_step):
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
             "config": config, "smooth_loss": smooth_loss, "rng": torch.get_rng_state(),
             "guide": guide.state_dict() if guide_step is not None else None, "guide_step": guide_step,
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


def train(args, config, device, amp, model, ema, opt, step, data, guide, guide_step):
    """Train until --steps or --max-minutes; checkpoints periodically, at the end, and on Ctrl-C.
    At --guide-at of the run, the EMA weights are copied into `guide` (for autoguidance at sampling)."""
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
            x1, _ = data.random_batch(args.batch_size)
            with amp:  # forward pass in bf16 where it is fast (see common.autocast); the loss is computed in fp32
                loss = flow_matching_loss(model, x1, args.t_sampling, args.t_mean)
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
            if guide_step is None and run_progress(args, step, time.time() - t_start) >= args.guide_at:
                guide.load_state_dict(ema.state_dict())
                guide_step = step
            smooth_loss = loss.item() if smooth_loss is None else 0.98 * smooth_loss + 0.02 * loss.item()
            if step % 25 == 0 or step == args.steps:
                show_progress(step, args.steps, smooth_loss, step - start_step, time.time() - t_start, deadline)
            if step % args.ckpt_every == 0:
                save_checkpoint(ckpt_path, model, ema, opt, step, config, smooth_loss, guide, guide_step)
    except KeyboardInterrupt:
        print("\ninterrupted: saving a checkpoint, then sampling", flush=True)
    print(flush=True)
    save_checkpoint(ckpt_path, model, ema, opt, step, config, smooth_loss, guide, guide_step)
    seconds = time.time() - t_start
    return {"steps": step, "steps_this_run": step - start_step, "train_seconds": round(seconds, 1),
            "train_images_per_s": round((step - start_step) * args.batch_size / max(seconds, 1e-9), 1),
            "params": n_params, "final_smooth_loss": smooth_loss, "guide_step": guide_step}


def show_progress(step, total, loss, steps_done, seconds, deadline):
    rate = steps_done / max(seconds, 1e-9)
    eta = min((total - step) / max(rate, 1e-9), max(deadline - time.time(), 0))
    line = f"step {step}/{total} | loss {loss:.4f} | {rate:.1f} it/s | ETA {int(eta // 60)}m{int(eta % 60):02d}s"
    # One updating line in a terminal; one line per update in a log file.
    print(("\r" + line) if sys.stdout.isatty() else line, end="" if sys.stdout.isatty() else "\n", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Outputs: sample grid, trajectory strip, arrays for scoring

def to_uint8(x):
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, H, W) for grey or (N, H, W, 3) for RGB."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def generate(args, model, device, amp, image_shape, guide, guide_step):
    """Sample --num-samples images in batches; write samples.png, trajectory.png and (optionally) the npz."""
    w = args.guidance
    if guide_step is None and w != 1:
        print("no guide in the checkpoint (training stopped before --guide-at): sampling without autoguidance",
              flush=True)
        w = 1.0
    velocity = autoguided(model, guide, w, args.guide_from, args.guide_until)
    gen = torch.Generator().manual_seed(args.seed)  # noise drawn on the CPU: the same images on every device
    images, strip = [], None
    t0 = time.time()
    for start in range(0, args.num_samples, 500):
        n = min(500, args.num_samples - start)
        noise = torch.randn(n, *image_shape, generator=gen).to(device)
        with amp:  # x stays fp32: x + dt * v promotes the bf16 velocity
            x, traj = euler_sample(velocity, noise, args.sample_steps, keep_every=max(1, args.sample_steps // 8))
        images.append(x.cpu())
        if strip is None:  # rows = 8 samples, columns = x_t from noise (left) to data (right)
            strip = torch.stack([xt[:8].cpu() for xt in traj], dim=1).flatten(0, 1)
            save_image((strip + 1) / 2, os.path.join(args.out_dir, "trajectory.png"), nrow=len(traj), padding=1)
    images = torch.cat(images)
    seconds = time.time() - t0
    grid = images[:100]
    save_image((grid.clamp(-1, 1) + 1) / 2, os.path.join(args.out_dir, "samples.png"),
               nrow=int(math.ceil(math.sqrt(len(grid)))), padding=1)
    if args.save_npz:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_npz)), exist_ok=True)
        np.savez_compressed(args.save_npz, images=to_uint8(images))
    how = f"autoguidance {w:g}" + (f" from step {guide_step}" if w != 1 else "")
    if w != 1 and (args.guide_from > 0 or args.guide_until < 1):
        how += f" for {args.guide_from:g} <= t < {args.guide_until:g}"
    print(f"sampled {len(images)} images in {seconds:.1f}s ({args.sample_steps} Euler steps, {how}) -> {args.out_dir}"
          + (f" and {args.save_npz}" if args.save_npz else ""), flush=True)
    return {"num_samples": len(images), "sample_steps": args.sample_steps, "sample_seconds": round(seconds, 1),
            "guidance": w, "guide_step": guide_step, "guide_from": args.guide_from,
            "guide_until": args.guide_until}


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
    guide, guide_step = copy.deepcopy(ema), None  # the early copy for autoguidance, filled in during training
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, metrics = 0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        if state.get("guide") is not None:
            guide.load_state_dict(state["guide"])
            guide_step = state["guide_step"]
        torch.set_rng_state(state["rng"].cpu())  # resume draws the same batches as an uninterrupted run
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        print(f"loaded {ckpt_path} (step {step})", flush=True)

    if not args.sample_only:
        data = load_dataset("mnist", args.data_root, train=True).to(device)
        metrics.update(train(args, config, device, amp, model, ema, opt, step, data, guide, guide_step))
        guide_step = metrics["guide_step"]

    ema.eval()
    guide.eval()
    metrics.update(generate(args, ema, device, amp, config["image_shape"], guide, guide_step))
    metrics["wall_seconds"] = round(time.time() - run_start, 1)
    if not args.sample_only:
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
            json.dump({"config": config, **metrics}, f, indent=2)


if __name__ == "__main__":
    main()
