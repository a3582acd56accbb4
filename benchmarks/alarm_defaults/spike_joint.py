"""Joint spike rule z>Z AND total/EMA(total)>R: healthy steps firing vs spikes/explosions caught (warm-up 50)."""
import glob, os, re
import numpy as np
from analyze import OUT, load, ema_z, ema_ratio
from spike_table import HEALTHY, SPIKE, EXPL
tags = sorted(os.path.basename(p)[:-4] for p in glob.glob(OUT + "/*.npz"))
fam = lambda t: re.sub(r"_s\d+$", "", t)
import sys; W = int(sys.argv[1]) if len(sys.argv) > 1 else 50
for alpha in (0.02, 0.05):
    H, B = [], []
    for t in tags:
        f = fam(t); d, meta = load(t); tot = d["total64"][: d["n_finite"]]
        if len(tot) <= W: continue
        z = ema_z(np.log(np.maximum(tot, 1e-45)), alpha, W); r = ema_ratio(tot, alpha, W)
        if f in HEALTHY:
            H.append((z, r))
        elif f in SPIKE:
            sp = meta["spike_step"]; H.append((z[:sp], r[:sp])); B.append((t, z[sp:sp+1], r[sp:sp+1]))
        elif f in EXPL and t in ("l_rnn_sgd01_s0", "l_rnn_sgd01_s1", "l_rnn_c01_sgd01_s2", "l_rnn_adam1e2_T50_s0"):
            k = int(np.nanargmax(z)); B.append((t, z[k:k+1], r[k:k+1]))
    print(f"alpha={alpha}")
    for Z in (4, 5, 6, 8):
        for R in (1, 5, 10, 20, 50):
            hf = sum(int(np.nansum((z > Z) & (r > R))) for z, r in H)
            caught = [t for t, z, r in B if (z > Z).any() and (r > R).any()]
            missed = [t for t, z, r in B if t not in caught]
            print(f"  z>{Z} & R>{R:<3}: healthy steps firing {hf:3d} / {sum(np.sum(np.isfinite(z)) for z, _ in H)}; missed {missed}")
