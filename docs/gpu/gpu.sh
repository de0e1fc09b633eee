#!/bin/bash
# One device run: A the five default commands alone (timed), B phase 4 quality (seeds 1-2, held-out wordings,
# synonyms; in parallel), C compile modes, D phase 5 at 128x128. X: extra arguments (a CPU dry run).
set -u
export PYTHONUNBUFFERED=1 FLOWMATCH_CACHE=/tmp/fmc HF_HUB_OFFLINE=1
D=${D:-.device-data/data}; L=$OUT/log.txt; G=/tmp/logs; N=/tmp/npz; P=/tmp/pics; X=${X:-}; CLIP=${CLIP:-/tmp/clip}
mkdir -p $G $N $P; END=$(( $(date +%s) + ${BUDGET:-545} ))
t() {  # t NAME CAP command...: run it alone, its output to $G/NAME.log, a summary line to log.txt
  local name=$1 cap=$2; shift 2; local left=$(( END - $(date +%s) ))
  if [ $left -lt 20 ]; then echo "== $name: skipped, out of time" >> $L; return; fi
  [ $cap -gt $left ] && cap=$left
  local s=$(date +%s%N); timeout $cap "$@" > $G/$name.log 2>&1; local rc=$?
  echo "== $name: rc $rc, $(( ($(date +%s%N) - s) / 1000000 )) ms; $(grep -E '^step ' $G/$name.log | tail -1)" >> $L
}
finish() { tar czf $OUT/logs.tgz -C /tmp logs; tar cf $OUT/npz.tar -C /tmp npz; tar cf $OUT/pics.tar -C /tmp pics; }
trap finish EXIT
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)"; } >> $L 2>&1
[ -z "$X" ] && { python3 .device-data/unpack.py && python3 .device-data/tools/make_offline_clip.py $CLIP --size base; } > $G/setup.log 2>&1
echo "== setup done at $(( $(date +%s) - END + ${BUDGET:-545} )) s" >> $L
# A: the five default commands, one after the other, nothing beside them
t p1 150 python3 phase1_flow.py --data-root $D --out-dir /tmp/p1 --num-samples 1000 --save-npz $N/p1.npz $X
t p2 150 python3 phase2_dit.py --data-root $D --out-dir /tmp/p2 --num-samples 1000 --save-npz $N/p2.npz $X
t p3 100 python3 phase3_cfg.py --data-root $D --out-dir /tmp/p3 --num-samples 100 --save-npz $N/p3.npz $X
t p4 150 python3 phase4_clip.py --data-root $D --clip-model $CLIP --out-dir /tmp/p4 --num-samples 100 --save-npz $N/p4.npz $X
t p5 200 python3 phase5_latent.py --data-root $D --clip-model $CLIP --out-dir /tmp/p5 $X ${X5:-}
# B: phase 4's quality: two more seeds (loss curves), the held-out wordings and the synonyms (from seed 0)
P4="python3 phase4_clip.py --data-root $D --clip-model $CLIP"
( t p4_seed1 150 $P4 --out-dir /tmp/p4s1 --seed 1 --num-samples 100 --save-npz $N/p4_seed1.npz $X ) &
( t p4_seed2 150 $P4 --out-dir /tmp/p4s2 --seed 2 --num-samples 100 --save-npz $N/p4_seed2.npz $X ) &
( t p4_heldout 100 $P4 --out-dir /tmp/p4 @docs/prompts/heldout.txt --num-samples 10 --save-npz $N/p4_heldout.npz $X
  t p4_synonyms 100 $P4 --out-dir /tmp/p4 @docs/prompts/synonyms.txt --num-samples 50 --save-npz $N/p4_synonyms.npz $X ) &
wait
# C: compile modes (phase 4, 600 steps; phase 1, 1,500 steps), each alone
for m in reduce-overhead max-autotune-no-cudagraphs; do
  t p4_$m 120 python3 .device-data/modes.py $m phase4_clip --data-root $D --clip-model $CLIP --out-dir /tmp/m4$m --steps 600 --num-samples 1 $X
  t p1_$m 90 python3 .device-data/modes.py $m phase1_flow --data-root $D --out-dir /tmp/m1$m --steps 1500 --num-samples 1 $X
done
# D: phase 5 at 128x128 (latents 32x32x4, 256 tokens)
t p5_128 240 python3 .device-data/size.py 128 --data-root $D --clip-model $CLIP --out-dir /tmp/p5_128 $X ${X5:-}
for d in p1 p2 p3 p4 p4s1 p4s2 p5 p5_128; do [ -f /tmp/$d/metrics.json ] && cp /tmp/$d/metrics.json $G/$d.metrics.json; done
cp /tmp/p4/samples.png $P/p4_synonyms_samples.png 2>/dev/null  # the last sampling run in /tmp/p4
for d in p4s1 p5 p5_128; do for f in samples.png progress.png recon.png; do
  [ -f /tmp/$d/$f ] && cp /tmp/$d/$f $P/${d}_$f; done; done
echo "== all done at $(( $(date +%s) - END + ${BUDGET:-545} )) s" >> $L
