"""python3 size.py SIZE ARGS...: phase 5 at SIZE x SIZE pixels, latents SIZE/4 (measurement only)."""
import os, sys, time
sys.path.insert(0, os.getcwd())
import phase5_latent as p5
size = int(sys.argv[1])
p5.IMAGE_SIZE, p5.LATENT_SHAPE = size, [4, size // 4, size // 4]
t = time.time()
p5.main(sys.argv[2:])
print(f"== phase 5 at {size}px: whole command {time.time() - t:.1f} s", flush=True)
