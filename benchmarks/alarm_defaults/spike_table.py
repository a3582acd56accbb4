"""Healthy max vs spike z-score / ratio for several EMA alphas (warm-up 50), EMA excluding flagged steps is NOT applied (plain EMA)."""
import glob, os, re
import numpy as np
from analyze import OUT, load, ema_z, ema_ratio

HEALTHY = ("a_resmlp20", "b_relu8", "b_relu8_bs8", "b_relu8_sgdm", "c_tf_ref", "c_tf_prev_preln", "c_tf_prev_postln",
           "c_tf_prev_postln_lr1e4", "c_tf_prev_postln_warm", "d_lstm_first", "d_lstm_sum", "e_cnn_bn", "f_converged",
           "g_adam_wd_big", "g_adamw_big")
SPIKE = ("m_spike", "m_spike_x100", "m_spike_res")
EXPL = ("l_rnn_sgd01", "l_rnn_c01_sgd01", "l_rnn_adam1e2_T50")
tags = sorted(os.path.basename(p)[:-4] for p in glob.glob(OUT + "/*.npz"))
fam = lambda t: re.sub(r"_s\d+$", "", t)
W = 50
for alpha in (0.02, 0.05, 0.1):
    for floor in (0.0, 0.1):
        hz, hr, hz_where = [], [], []
        out = {}
        for t in tags:
            f = fam(t)
            d, meta = load(t)
            tot = d["total64"][: d["n_finite"]]
            if len(tot) <= W:
                continue
            z = ema_z(np.log(np.maximum(tot, 1e-45)), alpha, W, floor)
            r = ema_ratio(tot, alpha, W)
            if f in HEALTHY:
                hz.append(np.nanmax(z)); hr.append(np.nanmax(r)); hz_where.append(t)
            elif f in SPIKE:
                sp = meta["spike_step"]
                hz.append(np.nanmax(z[:sp])); hr.append(np.nanmax(r[:sp])); hz_where.append(t + "(pre)")
                out.setdefault(f, []).append((z[sp], r[sp]))
            elif f in EXPL:
                k = int(np.nanargmax(z))
                out.setdefault(f, []).append((z[k], r[k]))
        i = int(np.argmax(hz)); j = int(np.argmax(hr))
        print(f"alpha={alpha} warm-up={W} std_floor={floor}: healthy max z {hz[i]:.3g} ({hz_where[i]}), healthy max R {hr[j]:.3g} ({hz_where[j]})")
        for f, v in out.items():
            print(f"     {f:20s} z: " + " ".join(f"{a:.3g}" for a, _ in v) + "   R: " + " ".join(f"{b:.3g}" for _, b in v))
