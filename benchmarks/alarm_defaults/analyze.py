"""Analyse the recorded runs in $GRADGUARD_STUDY_OUT (default runs/alarm_defaults): ratios, floors, zeros, spike z-scores."""
import glob
import json
import os
import sys

import numpy as np

OUT = os.environ.get("GRADGUARD_STUDY_OUT", "runs/alarm_defaults")
HEALTHY = ("a_", "b_", "c_", "d_", "e_", "f_", "g_")


def load(tag):
    d = dict(np.load(os.path.join(OUT, tag + ".npz")))
    meta = json.load(open(os.path.join(OUT, tag + ".json")))
    fin = np.isfinite(d["total64"])
    n = int(np.argmin(fin)) if not fin.all() else len(fin)
    d["n_finite"] = n
    d["nan_at"] = None if fin.all() else n
    return d, meta


def pct(x, qs=(50, 99, 100)):
    x = np.asarray(x, float)
    return [float(np.percentile(x, q)) if len(x) else float("nan") for q in qs]


def ema_z(logn, alpha, warmup, std_floor=0.0):
    """z_t of logn[t] against EMA mean/var of logn[0..t-1]; nan before warmup."""
    z = np.full(len(logn), np.nan)
    mu, var = logn[0], 0.0
    for t in range(1, len(logn)):
        x = logn[t]
        sd = max(np.sqrt(var), std_floor)
        if t >= warmup:
            z[t] = (x - mu) / sd if sd > 0 else (np.inf if x > mu else 0.0)
        diff = x - mu
        mu += alpha * diff
        var = (1 - alpha) * (var + alpha * diff * diff)
    return z


def ema_ratio(n, alpha, warmup):
    r = np.full(len(n), np.nan)
    m = n[0]
    for t in range(1, len(n)):
        if t >= warmup:
            r[t] = n[t] / m
        m += alpha * (n[t] - m)
    return r


def streak(mask):
    best = cur = 0
    for v in mask:
        cur = cur + 1 if v else 0
        best = max(best, cur)
    return best


def first_streak(mask, k):
    cur = 0
    for i, v in enumerate(mask):
        cur = cur + 1 if v else 0
        if cur >= k:
            return i
    return None


def analyse(tag):
    d, meta = load(tag)
    n = d["n_finite"]
    g = d["gnorm64"][:n]
    g32 = d["gnorm32"][:n]
    gm = d["gmax"][:n]
    groups = meta["groups"]
    numel = np.array(meta["numel"])
    # group numel
    pg = [p.rsplit(".", 1)[0] if "." in p else "<root>" for p in meta["params"]]
    gnumel = np.array([sum(numel[i] for i, o in enumerate(pg) if o == gname) for gname in groups])
    ismat = np.array([any(len_ > 0 for len_ in []) for _ in groups])  # placeholder
    res = dict(tag=tag, steps=n, nan_at=d["nan_at"], groups=len(groups), first=groups[0], last=groups[-1],
               loss0=float(d["loss"][0]), loss_end=float(d["loss"][n - 1]) if n else float("nan"))
    with np.errstate(divide="ignore", invalid="ignore"):
        maxmin = g.max(1) / g.min(1)
        lastfirst = g[:, -1] / g[:, 0]
        rms = g / np.sqrt(gnumel)
        lastfirst_rms = rms[:, -1] / rms[:, 0]
        maxmin_rms = rms.max(1) / rms.min(1)
    res["maxmin"] = pct(maxmin)
    res["lastfirst"] = pct(lastfirst)
    res["lastfirst_min"] = float(np.min(lastfirst)) if n else float("nan")
    res["lastfirst_rms"] = pct(lastfirst_rms)
    res["maxmin_rms"] = pct(maxmin_rms)
    res["first_norm"] = pct(g[:, 0], (0, 1, 50, 100))
    res["min_layer_norm"] = float(g.min()) if n else float("nan")
    res["argmin_layer"] = groups[int(np.argmin(g.min(0)))] if n else None
    res["max_layer_norm"] = float(g.max()) if n else float("nan")
    res["argmax_layer"] = groups[int(np.argmax(g.max(0)))] if n else None
    res["total"] = pct(d["total64"][:n], (0, 50, 100))
    res["maxabs"] = pct(d["maxabs"][:n], (50, 100))
    # exact zeros
    zero_groups = sorted({groups[j] for j in range(len(groups)) if (gm[:, j] == 0).any()})
    pmax = d["pmax"][:n]
    zero_params = {}
    for j, p in enumerate(meta["params"]):
        k = int((pmax[:, j] == 0).sum())
        if k:
            zero_params[p] = k
    res["zero_groups"] = zero_groups
    res["zero_params"] = zero_params
    # near-zero params: max|g| < 1e-6 * median of other params' max
    under = int(((g32 == 0) & (gm > 0)).sum())
    res["fp32_norm_underflow_cells"] = under
    # absolute rules
    res["rule_layer_gt_100"] = int((g > 100).any(1).sum())
    res["rule_first_lt_1e-5"] = int((g[:, 0] < 1e-5).sum())
    res["rule_total_gt_100"] = int((d["total64"][:n] > 100).sum())
    # vanishing patience analysis
    for L in (1e2, 1e3, 1e4, 1e5, 1e6):
        res[f"lf>{L:g}"] = (int((lastfirst > L).sum()), streak(lastfirst > L))
    for F in (1e-5, 1e-6, 1e-7, 1e-8, 1e-10):
        res[f"first<{F:g}"] = (int((g[:, 0] < F).sum()), streak(g[:, 0] < F))
    # spike z
    tot = d["total64"][:n]
    logn = np.log(np.maximum(tot, 1e-45))
    zs = {}
    for a in (0.02, 0.05):
        for w in (20, 50):
            z = ema_z(logn, a, w)
            zf = ema_z(logn, a, w, std_floor=0.1)
            r = ema_ratio(tot, a, w)
            zs[(a, w)] = dict(z=z, zf=zf, r=r)
    res["_z"] = zs
    res["_lastfirst"] = lastfirst
    res["_first"] = g[:, 0]
    res["_total"] = tot
    res["_meta"] = meta
    return res


def fmt(x):
    return "/".join(f"{v:.2g}" for v in x)


def main():
    tags = sorted(os.path.basename(p)[:-4] for p in glob.glob(OUT + "/*.npz"))
    if len(sys.argv) > 1:
        tags = [t for t in tags if any(t.startswith(a) for a in sys.argv[1:])]
    rs = [analyse(t) for t in tags]
    print("== (1)(2) ratios: median/p99/max over steps; first-layer norm min/p1/median/max")
    print(f"{'run':24s} {'n':>4s} {'nan':>4s} {'loss0->end':>14s} {'max/min':>22s} {'last/first':>22s} {'lf_rms':>20s} {'first min/p1/med/max':>30s} {'maxlayer':>9s} {'total min/med/max':>22s}")
    for r in rs:
        print(f"{r['tag']:24s} {r['steps']:4d} {str(r['nan_at']):>4s} {r['loss0']:6.3g}->{r['loss_end']:<7.3g} {fmt(r['maxmin']):>22s} {fmt(r['lastfirst']):>22s} {fmt(r['lastfirst_rms']):>20s} {fmt(r['first_norm']):>30s} {r['max_layer_norm']:9.3g} {fmt(r['total']):>22s}")
    print("\n== (4)(5) exact zeros, fp32 underflow, absolute rules (#steps firing), min last/first")
    for r in rs:
        print(f"{r['tag']:24s} zero_groups={r['zero_groups']} zero_params={r['zero_params']} "
              f"fp32_underflow={r['fp32_norm_underflow_cells']} layer>100:{r['rule_layer_gt_100']} "
              f"first<1e-5:{r['rule_first_lt_1e-5']} total>100:{r['rule_total_gt_100']} "
              f"minlayer={r['min_layer_norm']:.2g}({r['argmin_layer']}) maxlayer={r['max_layer_norm']:.2g}({r['argmax_layer']}) lf_min={r['lastfirst_min']:.2g}")
    print("\n== vanishing: (#steps, longest streak) with last/first > L, and first < F")
    keys = [k for k in rs[0] if k.startswith("lf>") or k.startswith("first<")]
    print(f"{'run':24s} " + " ".join(f"{k:>11s}" for k in keys))
    for r in rs:
        print(f"{r['tag']:24s} " + " ".join(f"{str(r[k]):>11s}" for k in keys))
    print("\n== spike: max z over steps>=warmup (raw / std floor 0.1), max total/EMA(total); for spike runs z at spike")
    for (a, w) in [(0.02, 20), (0.02, 50), (0.05, 20), (0.05, 50)]:
        print(f"-- alpha={a} warmup={w}")
        for r in rs:
            zz = r["_z"][(a, w)]
            z, zf, rat = zz["z"], zz["zf"], zz["r"]
            if np.all(np.isnan(z)):
                print(f"  {r['tag']:24s} (too short)")
                continue
            am = int(np.nanargmax(z))
            extra = ""
            sp = r["_meta"].get("spike_step")
            if sp is not None:
                zo = np.delete(z, [sp, sp + 1, sp + 2])
                extra = (f" z@spike={z[sp]:.3g} zf@spike={zf[sp]:.3g} ratio@spike={rat[sp]:.3g} "
                         f"max z pre-spike={np.nanmax(z[:sp]):.3g} max z after(>sp+1)={np.nanmax(z[sp + 2:]):.3g}")
            print(f"  {r['tag']:24s} maxz={np.nanmax(z):7.3g}@{am:<4d} maxz_floor={np.nanmax(zf):7.3g} "
                  f"max ratio={np.nanmax(rat):8.3g} p99z={np.nanpercentile(z, 99):6.3g}{extra}")


if __name__ == "__main__":
    main()
