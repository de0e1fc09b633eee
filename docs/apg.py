"""APG, the guidance of docs/EXPERIMENTS.md (round 8), tried on a phase-4 checkpoint without changing the
phase: its guided_velocity is replaced, then docs/cfg_interval.py samples and scores as usual.

    ETA=0 python docs/apg.py phase4_clip.py OUT RESULTS.jsonl "s a b" ... -- ARGS

APG (Sadat et al., 2024, adaptive projected guidance): the step is taken on the denoised estimate
D = x_t + (1 - t) v; of D_cond - D_uncond, the part parallel to D_cond is scaled by ETA, the rest kept:
D = D_cond + (s - 1) (diff_orth + ETA diff_par), then back to a velocity. No norm threshold, no momentum."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
phase = __import__(sys.argv[1].removesuffix(".py"))
ETA = float(os.environ.get("ETA", 0))


def guided_velocity(model, x, t, ids, cfg_scale, table, interval=None):
    (text, mask), (start, until) = table, interval or (phase.CFG_FROM, phase.CFG_UNTIL)
    null = torch.full_like(ids, len(text) - 1)
    if cfg_scale == 1 or not start <= t[0] < until:
        return model(x, t, text[ids], mask[ids])
    v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text[ids], text[null]]),
                     torch.cat([mask[ids], mask[null]])).chunk(2)
    v_c, v_u, tt = v_c.float(), v_u.float(), t.view(-1, 1, 1, 1).float()
    d_c, diff = x.float() + (1 - tt) * v_c, (1 - tt) * (v_c - v_u)   # denoised estimate and the guidance on it
    unit = d_c / d_c.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    par = (diff * unit).flatten(1).sum(1).view(-1, 1, 1, 1) * unit
    return (v_c + (cfg_scale - 1) * (diff - par + ETA * par) / (1 - tt)).to(x.dtype)


phase.guided_velocity = guided_velocity
import cfg_interval  # noqa: E402

cfg_interval.main()
