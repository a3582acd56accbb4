"""Compact per-family summary (seeds pooled) of the recorded runs."""
import glob
import os
import re
from collections import defaultdict

import numpy as np

from analyze import OUT, analyse, ema_z, ema_ratio

tags = sorted(os.path.basename(p)[:-4] for p in glob.glob(OUT + "/*.npz"))
fam = defaultdict(list)
for t in tags:
    fam[re.sub(r"_s\d+$", "", t)].append(t)


def rolling_median_max(x, w):
    lx = np.log10(np.maximum(x, 1e-300))
    if len(lx) < w:
        return float("nan")
    return float(10 ** max(np.median(lx[i - w:i]) for i in range(w, len(lx) + 1)))


def rolling_median_min(x, w):
    lx = np.log10(np.maximum(x, 1e-300))
    if len(lx) < w:
        return float("nan")
    return float(10 ** min(np.median(lx[i - w:i]) for i in range(w, len(lx) + 1)))


rows = []
print(f"{'family':28s} {'#':>2s} {'nan@':>8s} {'LF med':>8s} {'LF p99':>8s} {'LF max':>8s} {'LF min':>8s} "
      f"{'rm20 max':>8s} {'rm20 min':>8s} {'rm50max':>8s} {'1st min':>8s} {'1st med':>8s} {'lay max':>8s} {'tot max':>8s} "
      f"{'z.02/20':>7s} {'z.02/50':>7s} {'z.05/20':>7s} {'z.05/50':>7s} {'R.02/50':>8s} {'R.05/50':>8s} zero")
for f, ts in fam.items():
    rs = [analyse(t) for t in ts]
    lf = np.concatenate([r["_lastfirst"] for r in rs])
    first = np.concatenate([r["_first"] for r in rs])
    tot = np.concatenate([r["_total"] for r in rs])
    rm20 = max(rolling_median_max(r["_lastfirst"], 20) for r in rs)
    rm20min = min(rolling_median_min(r["_lastfirst"], 20) for r in rs)
    rm50 = max(rolling_median_max(r["_lastfirst"], 50) for r in rs)

    def zmax(a, w, key="z"):
        vals = []
        for r in rs:
            z = r["_z"][(a, w)][key].copy()
            sp = r["_meta"].get("spike_step")
            if sp is not None:
                z = z[:sp]  # pre-spike only
            if np.any(np.isfinite(z)):
                vals.append(np.nanmax(z))
        return max(vals) if vals else float("nan")
    nan_at = [r["nan_at"] for r in rs]
    zero = sorted({g for r in rs for g in r["zero_groups"]})
    print(f"{f:28s} {len(ts):2d} {','.join('-' if n is None else str(n) for n in nan_at):>8s} "
          f"{np.median(lf):8.2g} {np.percentile(lf, 99):8.2g} {lf.max():8.2g} {lf.min():8.2g} {rm20:8.2g} {rm20min:8.2g} {rm50:8.2g} "
          f"{first.min():8.2g} {np.median(first):8.2g} {max(r['max_layer_norm'] for r in rs):8.2g} {tot.max():8.2g} "
          f"{zmax(.02, 20):7.3g} {zmax(.02, 50):7.3g} {zmax(.05, 20):7.3g} {zmax(.05, 50):7.3g} "
          f"{zmax(.02, 50, 'r'):8.3g} {zmax(.05, 50, 'r'):8.3g} {zero}")

print("\nspike runs (m_*): z and total/EMA at the spike step, per seed")
for t in fam.get("m_spike", []):
    r = analyse(t)
    sp = r["_meta"]["spike_step"]
    print(t, " ".join(f"a{a}/w{w}: z={r['_z'][(a, w)]['z'][sp]:.3g} R={r['_z'][(a, w)]['r'][sp]:.3g}"
                       for a in (.02, .05) for w in (20, 50)))
print("\nexploding RNN runs: step of max z, z there, total there, and steps to first non-finite")
for f in [k for k in fam if k.startswith("l_")]:
    for t in fam[f]:
        r = analyse(t)
        for a, w in ((.02, 50), (.05, 50), (.02, 20)):
            z = r["_z"][(a, w)]["z"]
            if not np.any(np.isfinite(z)):
                continue
            am = int(np.nanargmax(z))
            firsts = {thr: (int(np.argmax(z > thr)) if np.any(z > thr) else None) for thr in (5, 6, 8, 10)}
            print(f"  {t:26s} a={a} w={w}: max z {z[am]:.3g} @ {am} (total {r['_total'][am]:.3g}); first step z>thr {firsts}; nan_at {r['nan_at']}")
