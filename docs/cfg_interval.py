"""The guidance-interval measurement of docs/EXPERIMENTS.md (round 6): one trained phase-3/4/5 checkpoint sampled
with several CFG scales and intervals, the same seed (the same noise) each time, scored by the reference scorer.

    python docs/cfg_interval.py phase4_clip.py OUT_DIR RESULTS.jsonl "7 0 1" "7 0.2 1" "4 0.1 0.8" ... -- ARGS

Each "s a b" samples OUT_DIR's model with --cfg-scale s, CFG acting for a <= t < b (the phase's CFG_FROM and
CFG_UNTIL, set here, not on the command line), ARGS passed on (--num-samples, --clip-model, ...). One JSON line
per setting: the sampling time and, with SCORER=path/to/score.py (a scorer printing one JSON line with --json),
the scores. Run it alone: it times the sampling."""
import importlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    script, out_dir, results, *rest = sys.argv[1:]
    split = rest.index("--") if "--" in rest else len(rest)
    settings, args = rest[:split], rest[split + 1:]
    phase = importlib.import_module(script.removesuffix(".py"))
    for setting in settings:
        scale, start, until = setting.split()
        phase.CFG_FROM, phase.CFG_UNTIL = float(start), float(until)
        npz = os.path.join(out_dir, f"cfg{scale}_{start}_{until}.npz")
        t0 = time.time()
        phase.main(["--out-dir", out_dir, "--cfg-scale", scale, "--save-npz", npz, *args])
        seconds = time.time() - t0
        score = None
        if os.environ.get("SCORER"):
            line = subprocess.run([sys.executable, os.environ["SCORER"], npz, "--json"], capture_output=True,
                                  text=True).stdout
            score = json.loads(line.strip().splitlines()[-1])
        with open(results, "a") as f:
            f.write(json.dumps({"scale": float(scale), "from": float(start), "until": float(until),
                                "seconds": round(seconds, 1), "score": score}) + "\n")


if __name__ == "__main__":
    main()
