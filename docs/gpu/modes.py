"""python3 modes.py MODE PHASE_MODULE ARGS...: run a phase with module.compile(mode=MODE) (measurement only)."""
import os, sys, time
sys.path.insert(0, os.getcwd())
import torch
mode, phase, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
compile_ = torch.nn.Module.compile
torch.nn.Module.compile = lambda self, *a, **k: compile_(self, mode=None if mode == "default" else mode)
t = time.time()
__import__(phase).main(argv)
print(f"== {phase} mode {mode}: whole command {time.time() - t:.1f} s", flush=True)
