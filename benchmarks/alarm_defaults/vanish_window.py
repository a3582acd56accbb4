"""Rolling-median (window W) of last/first: per run max, and first step it exceeds L (detection latency)."""
import glob, os, re
import numpy as np
from analyze import OUT, analyse
tags = sorted(os.path.basename(p)[:-4] for p in glob.glob(OUT + "/*.npz"))
for W in (10, 20, 50):
    print(f"window {W}")
    for t in tags:
        r = analyse(t)
        lf = np.log10(np.maximum(r["_lastfirst"], 1e-300))
        if len(lf) < W:
            continue
        rm = np.array([np.median(lf[i - W:i]) for i in range(W, len(lf) + 1)])
        first = {L: (int(np.argmax(rm > np.log10(L))) + W - 1 if (rm > np.log10(L)).any() else None) for L in (1e2, 3e2, 1e3, 1e4, 1e5)}
        cnt = {L: int((rm > np.log10(L)).sum()) for L in (1e2, 3e2, 1e3)}
        print(f"  {t:28s} max {10**rm.max():9.3g} min {10**rm.min():9.3g}  first step > L {first}  #windows>L {cnt}")
