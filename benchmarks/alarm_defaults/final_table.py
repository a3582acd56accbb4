"""Final compact per-family table (seeds pooled; finite steps only)."""
import glob, os, re
from collections import defaultdict
import numpy as np
from analyze import OUT, analyse, load
tags = sorted(os.path.basename(p)[:-4] for p in glob.glob(OUT + "/*.npz"))
fam = defaultdict(list)
for t in tags:
    if t.startswith("old_"): continue
    fam[re.sub(r"_s\d+$", "", t)].append(t)
g = lambda v: f"{v:.2g}"
print("| family | seeds x steps | loss start->end (seed 0) | max/min all groups med/p99/max | last/first med/p99/max | first-layer min/p1/med | max layer norm | total max | exact-zero groups (steps) |")
print("|---|---|---|---|---|---|---|---|---|")
for f, ts in fam.items():
    rs = [analyse(t) for t in ts]
    mm, lf, first = [], [], []
    for t in ts:
        d, _ = load(t); n = d["n_finite"]; gn = d["gnorm64"][:n]
        with np.errstate(divide="ignore", invalid="ignore"):
            mm.append(gn.max(1) / gn.min(1)); lf.append(gn[:, -1] / gn[:, 0]); first.append(gn[:, 0])
    mm, lf, first = map(np.concatenate, (mm, lf, first))
    zs = defaultdict(int)
    for r in rs:
        for p, k in r["zero_params"].items():
            pass
        d, meta = load(r["tag"]); gm = d["gmax"][: d["n_finite"]]
        for j, gname in enumerate(meta["groups"]):
            k = int((gm[:, j] == 0).sum())
            if k: zs[gname] += k
    zstr = ", ".join(f"{k}({v})" for k, v in zs.items()) or "none"
    if len(zstr) > 60: zstr = f"{len(zs)} groups, e.g. {list(zs)[0]}({zs[list(zs)[0]]})"
    p = lambda x, q: np.percentile(x[np.isfinite(x)], q) if np.isfinite(x).any() else float('nan')
    mmx = "inf" if np.isinf(mm).any() else g(mm.max()); lfx = "inf" if np.isinf(lf).any() else g(lf.max())
    print(f"| {f} | {len(ts)}x{max(r['steps'] for r in rs)} | {g(rs[0]['loss0'])}->{g(rs[0]['loss_end'])} | {g(np.median(mm))}/{g(p(mm,99))}/{mmx} | "
          f"{g(np.median(lf))}/{g(p(lf,99))}/{lfx} | {g(first.min())}/{g(np.percentile(first,1))}/{g(np.median(first))} | "
          f"{g(max(r['max_layer_norm'] for r in rs))} | {g(max(r['total'][2] for r in rs))} | {zstr} |")
