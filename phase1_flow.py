"""
Phase 1 — flow matching from scratch: unconditional MNIST digits with a small CNN.

New in this phase: everything. Take a noise image x0 ~ N(0, I) and a data image x1. Walk on the straight line
between them:

    x_t = (1 - t) * x0 + t * x1,        t in [0, 1]      (t = 0 is pure noise, t = 1 is data)

Along that line the velocity is constant: dx_t/dt = x1 - x0. Train a network v(x_t, t) to predict it:

    loss = E_{x0, x1, t} || v(x_t, t) - (x1 - x0) ||^2

For one pair the target is exact; over all pairs that pass through the same x_t the network learns their
average, which is the velocity field that carries the whole noise distribution onto the data distribution.
To generate, start from noise at t = 0 and integrate dx/dt = v(x, t) to t = 1 (Euler: x += dt * v).

A better sampler for free: autoguidance (Karras et al., 2024). Keep a copy of the model from early in training;
it makes the same kinds of mistakes as the final model, only bigger. Extrapolate away from it:

    v = v_early + w * (v_final - v_early),      w > 1      (w = 1 is the plain model)

Run:
    python phase1_flow.py                          # train, then sample; run it again to sample from out/phase1
    python phase1_flow.py --resume --steps 8000    # train the same model further
    python phase1_flow.py --guidance 1             # sample without autoguidance
"""
import argparse
import copy
import json
import math
import os
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
                    gpu_mfu, load_dataset, note_ignored, npz_file, number, random_state, set_random_state, settle,
                    step_flops, use_compile)

# ----------------------------------------------------------------------------------------------------------
# Settings: the values of the default run, measured in docs/RESULTS.md

PHASE = 1
DATASET, IMAGE_SHAPE = "mnist", [1, 28, 28]
STEPS = 4700           # optimizer steps of the default run
BATCH_SIZE = 64
LR = 4e-3              # peak AdamW learning rate
WARMUP_STEPS = 200     # linear warmup from 0 to LR ...
COOLDOWN = 0.3         # ... and a linear decay to 0 over the last 30% of the run
EMA_DECAY = 0.999      # samples come from an exponential moving average of the weights
T_MEAN = -0.5          # training times t = sigmoid(N(T_MEAN, 1)): more of them nearer the noise end
WIDTH = 48             # U-Net channels at 14x14 (twice that at 7x7)
SAMPLE_STEPS, NUM_SAMPLES = 50, 64   # Euler steps from noise to data; images drawn
GUIDANCE = 4.0         # autoguidance weight w (1 = off)
GUIDE_AT = 0.2         # the guide is the EMA model as it was at 20% of the run ...
GUIDE_FROM, GUIDE_UNTIL = 0.0, 1.0   # ... used for GUIDE_FROM <= t < GUIDE_UNTIL: here the whole path
CKPT_EVERY = 500       # also save a checkpoint (and a row of progress.png) every this many steps
COMPILE = True         # torch.compile the model on a CUDA GPU: fused kernels, several times faster (slower start)
STEPS_ROWS = [1, 2, 4, 8, 16, 50]   # rows of steps.png: the same noise, integrated in this many Euler steps


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Phase 1: unconditional flow matching on MNIST with a small CNN.")
    parser.add_argument("--steps", type=number(int), default=STEPS, help="optimizer steps to train for")
    parser.add_argument("--max-minutes", type=number(float), help="stop training after this much wall time")
    parser.add_argument("--batch-size", type=number(int), help=f"default {BATCH_SIZE}, or the checkpoint's")
    parser.add_argument("--lr", type=number(float), help=f"peak learning rate (default {LR:g}, or the checkpoint's)")
    parser.add_argument("--width", type=number(int), default=WIDTH, help="model size: channels, a multiple of 8")
    parser.add_argument("--num-samples", type=number(int), default=NUM_SAMPLES, help="how many images to draw")
    parser.add_argument("--sample-steps", type=number(int), default=SAMPLE_STEPS, help="Euler steps from noise to data")
    parser.add_argument("--guidance", type=number(float, 0, True), default=GUIDANCE, help="autoguidance w (1 = off)")
    parser.add_argument("--resume", action="store_true", help="train <out-dir>/ckpt.pt further, up to --steps")
    parser.add_argument("--save-npz", metavar="PATH", type=npz_file, help="also save the samples as uint8 arrays")
    parser.add_argument("--data-root", default="data", help="where MNIST is, or is downloaded to")
    parser.add_argument("--out-dir", default="out/phase1", help="checkpoint, pictures and metrics go here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="bf16 autocast or fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on "
                        "CUDA only; --no-compile for old GPUs, or Windows without triton)")
    parser.add_argument("--seed", type=number(int, 0, True, 2**64), default=0)
    args = parser.parse_args(argv)
    if args.width % 8:
        parser.error("--width must be a multiple of 8 (GroupNorm uses 8 groups)")
    return args


# ----------------------------------------------------------------------------------------------------------
# Model: a small U-Net that predicts the velocity v(x_t, t)

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


class ResBlock(nn.Module):
    """Two 3x3 convs with a residual path; the time embedding shifts the features in between."""

    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(t_emb)[:, :, None, None]  # tell every layer "how noisy" its input is
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """A tiny U-Net: 14x14 -> 7x7 and back with a skip connection, the classic denoiser shape.

    pixel_unshuffle folds every 2x2 block of pixels into 4 channels (28x28x1 -> 14x14x4), exactly invertible by
    pixel_shuffle at the end. The convs then run on 4x fewer positions: most of the speed of this model on a
    laptop comes from here."""

    def __init__(self, channels, width):
        super().__init__()
        c, t_dim = width, 4 * width
        self.time_embed = TimeEmbedding(t_dim)
        self.stem = nn.Conv2d(4 * channels, c, 3, padding=1)
        self.enc = ResBlock(c, c, t_dim)                                  # 14x14
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)           # -> 7x7
        self.mid1 = ResBlock(2 * c, 2 * c, t_dim)
        self.mid2 = ResBlock(2 * c, 2 * c, t_dim)
        self.dec = ResBlock(3 * c, c, t_dim)                              # 14x14, skip concatenated
        self.head = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 4 * channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # start by predicting v = 0: a calm start for the loss
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x, t):                                  # x: (B, 1, 28, 28), t: (B,)
        e = self.time_embed(t)                                # (B, t_dim)
        h1 = self.enc(self.stem(F.pixel_unshuffle(x, 2)), e)  # (B, c, 14, 14)
        h = self.mid2(self.mid1(self.down(h1), e), e)         # (B, 2c, 7, 7)
        h = self.dec(torch.cat([F.interpolate(h, scale_factor=2.0), h1], 1), e)   # (B, c, 14, 14)
        return F.pixel_shuffle(self.head(h), 2)               # velocity, (B, 1, 28, 28) like x


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


def flow_matching_loss(model, x1, t_mean=0.0):
    """x1: a batch of data. The mean squared error between predicted and true velocity at random (x_t, t)."""
    x0 = torch.randn_like(x1)                                  # noise
    t = sample_t(len(x1), x1.device, t_mean)
    xt, target = interpolate(x0, x1, t)
    return F.mse_loss(model(xt, t), target)


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


def autoguided(model, guide, w, start=0.0, until=1.0):
    """Autoguidance: v = v_guide + w (v_model - v_guide) for start <= t < until, the guide an early copy of the model.

    Early in training the model already knows roughly where digits are but draws them badly; the difference
    between the final and the early model points the way training was improving the samples, and w > 1 goes
    further that way. Unlike sampling from less noise, it keeps most of the variety. Guiding only part of the path
    (Kynkaanniemi et al., 2024) leaves the steps where guidance does more harm than good to the plain model."""
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

def train(args, model, ema, opt, data, amp, step, save, guide):
    """Train until --steps or --max-minutes; `save(step)` checkpoints periodically, at the end and on Ctrl-C."""

    def batch_loss():  # a random batch through the model: the lines of this loop that the later phases change
        x1, _ = data.random_batch(args.batch_size)
        with amp:  # forward pass in bf16 where it is fast (see common.autocast); the loss in fp32
            return flow_matching_loss(model, x1, T_MEAN)

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
            if guide.step is None and done >= GUIDE_AT:  # autoguidance's early copy: the EMA as it is now
                guide.load_state_dict(ema.state_dict())
                guide.step = step
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
# Outputs: sample grid, trajectory, steps, progress, arrays for evaluation

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


def generate(args, model, device, amp, guide):
    """Sample --num-samples images in batches; write samples.png, trajectory.png/.gif, steps.png and the npz."""
    w = args.guidance if guide.step is not None else 1.0  # no guide yet: training stopped before GUIDE_AT
    velocity = autoguided(model, guide, w, GUIDE_FROM, GUIDE_UNTIL)
    gen = torch.Generator().manual_seed(args.seed)  # noise drawn on the CPU: the same images on every device
    images, t0 = [], time.time()
    for start in range(0, args.num_samples, 500):  # in chunks, so 10,000 samples fit in a laptop's memory
        noise = torch.randn(min(500, args.num_samples - start), *IMAGE_SHAPE, generator=gen).to(device)
        with amp:  # x stays fp32: x + dt * v promotes the bf16 velocity
            x, _ = euler_sample(velocity, noise, args.sample_steps)
        images.append(x.cpu())
    images, seconds = torch.cat(images), time.time() - t0
    save_grid(images[:100], os.path.join(args.out_dir, "samples.png"), nrow=math.ceil(math.sqrt(len(images[:100]))))
    # Three more pictures, from 8 more noises: how noise becomes a digit (a strip of 9 moments and an animation
    # of every step), and what the same noise gives with fewer Euler steps (straight paths need few).
    noise = torch.randn(8, *IMAGE_SHAPE, generator=gen).to(device)
    with amp:
        _, traj = euler_sample(velocity, noise, args.sample_steps)
        by_steps = [euler_sample(velocity, noise, n)[0] for n in STEPS_ROWS]
    strip = torch.stack([traj[round(i * args.sample_steps / 8)].cpu() for i in range(9)], 1)  # rows = samples,
    save_grid(strip.flatten(0, 1), os.path.join(args.out_dir, "trajectory.png"), nrow=9)  # columns = t from 0 to 1
    save_grid(torch.cat(by_steps), os.path.join(args.out_dir, "steps.png"), nrow=len(noise),
              titles=[f"{n} step" + "s" * (n > 1) for n in STEPS_ROWS])
    frames = [save_grid(x.cpu(), None, nrow=len(noise)) for x in traj]  # every Euler step, drawn as the pictures are
    frames[0].save(os.path.join(args.out_dir, "trajectory.gif"), save_all=True, append_images=frames[1:], loop=0,
                   duration=[60] * (len(frames) - 1) + [1500])  # ms per frame; the finished digits stay 1.5 s
    if args.save_npz:  # for an evaluation: uint8, (N, H, W) grey or (N, H, W, 3) RGB
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).squeeze(-1).numpy()
        atomic_write(args.save_npz, lambda f: np.savez_compressed(f, images=uint8))
    how = f"autoguidance {w:g} from step {guide.step}" if w != 1 else "no guidance"
    print(f"sampled {len(images)} images in {seconds:.1f}s ({args.sample_steps} Euler steps, {how}) -> {args.out_dir}"
          + (f" and {args.save_npz}" if args.save_npz else ""), flush=True)


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

    config = state["config"] if state else {"width": args.width}  # a checkpoint rebuilds the model it trained
    settle(args, config, {"batch_size": BATCH_SIZE, "lr": LR})  # a resume trains on as its run began
    model = UNet(IMAGE_SHAPE[0], config["width"]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    guide = copy.deepcopy(ema)  # autoguidance's early copy of the EMA, taken in train() at GUIDE_AT of the run
    guide.step = None           # the step it was taken at (None: not yet)
    # fused: one kernel updates all the weights (on CUDA, CPU and MPS)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    step, progress = 0, state.get("progress", []) if state else []  # progress.png's rows: (step, 8 images)
    if state:
        restore(ckpt_path, state, {"model": model, "ema": ema, "opt": opt})
        step, guide.step = state["step"], state.get("guide_step")
        if guide.step is not None:  # it has autoguidance's early copy
            restore(ckpt_path, state, {"guide": guide})
        set_random_state(state, device)  # resume draws the same batches as an uninterrupted run
        print(f"found {ckpt_path} (step {step}): " + ("training it further" if training else "sampling from it"
              + (" (it has --steps already: raise --steps to train further)" if args.resume else "")), flush=True)
        note_ignored(args, config, {"width": WIDTH})
    if use_compile(args.compile, COMPILE, device):
        for module in (model, ema, guide):  # in place: the weights, and so the checkpoints, stay as they are
            module.compile()

    if training:
        data = load_dataset(DATASET, args.data_root, train=True).to(device)
        check_same_data(config, data, DATASET, ckpt_path)
        noise = torch.randn(8, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(args.seed)).to(device)

        def save(s):  # a checkpoint, and a row of progress.png: the same 8 noises through the model as it is now
            with amp:
                row = (s, euler_sample(ema, noise, args.sample_steps)[0].cpu())
            save_checkpoint(ckpt_path, model, ema, opt, s, config,
                            {"progress": progress + [row], "guide": guide.state_dict(), "guide_step": guide.step})
            progress.append(row)  # the picture shows only what is on disk
            save_grid(torch.cat([x for _, x in progress]), os.path.join(args.out_dir, "progress.png"), nrow=8,
                      titles=[f"step {s}" for s, _ in progress])
        metrics = train(args, model, ema, opt, data, amp, step, save, guide)
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:  # before sampling: an interrupt there
            json.dump({"config": config, **metrics}, f, indent=2)          # keeps them (sampling never rewrites them)
    generate(args, ema, device, amp, guide)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside training (loading data, sampling): nothing to save
        fail("interrupted")
