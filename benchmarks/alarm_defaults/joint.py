"""Longest streak (consecutive steps) of: last/first > L AND first-layer norm < F, per family (max over seeds)."""
import glob, os, re
from collections import defaultdict
import numpy as np
from analyze import OUT, analyse, streak

tags = sorted(os.path.basename(p)[:-4] for p in glob.glob(OUT + "/*.npz"))
fam = defaultdict(list)
for t in tags:
    fam[re.sub(r"_s\d+$", "", t)].append(t)
Ls = (1e2, 3e2, 1e3, 1e4, 1e5)
Fs = (np.inf, 1e-4, 1e-5)
hdr = " ".join(f"{f'L{L:g}&F{F:g}':>13s}" for F in Fs for L in Ls)
print(f"{'family':26s} {'steps':>5s} {hdr}")
for f, ts in fam.items():
    rs = [analyse(t) for t in ts]
    cells = []
    for F in Fs:
        for L in Ls:
            cells.append(max(streak((r["_lastfirst"] > L) & (r["_first"] < F)) for r in rs))
    print(f"{f:26s} {min(r['steps'] for r in rs):5d} " + " ".join(f"{c:13d}" for c in cells))
print()
for t in ("sigmoid50_s0", "sigmoid20_s0"):
    r = analyse(t)
    print(t, "fp32 group-norm underflow cells (norm32==0 while max|g|>0):", r["fp32_norm_underflow_cells"], "zero groups", r["zero_groups"])
