"""Does skipping flagged steps (z>thr on log total norm, EMA alpha, warm-up) prevent the NaN in the exploding RNN?
Also: effect of updating vs not updating the EMA with a flagged step (second spike injected into m_spike)."""
import math, numpy as np, torch, torch.nn.functional as F
from run_models import RNNReg
from analyze import ema_z
torch.set_num_threads(1)

def run(seed, T, c, lr, thr, alpha=0.02, warm=50, steps=300, update_on_flag=False):
    torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
    m = RNNReg(c); opt = torch.optim.SGD(m.parameters(), lr=lr)
    mu = var = None; flagged = []; nan_at = None
    for s in range(steps):
        x = torch.randn(64, T, 5, generator=g); y = x[:, :, 0].sum(1) / T ** 0.5
        opt.zero_grad(); l = F.mse_loss(m(x), y); l.backward()
        n = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]).item()
        if not math.isfinite(n):
            nan_at = s; break
        ln = math.log(max(n, 1e-45))
        if mu is None:
            mu, var = ln, 0.0; flag = False
        else:
            sd = math.sqrt(var)
            z = (ln - mu) / sd if sd > 0 else 0.0
            flag = thr is not None and s >= warm and z > thr
            if not flag or update_on_flag:
                d = ln - mu; mu += alpha * d; var = (1 - alpha) * (var + alpha * d * d)
        if flag:
            flagged.append((s, round(n, 3)))
            continue  # skip the step
        opt.step()
    return nan_at, flagged, l.item()

for seed in (0, 1):
    for thr in (None, 8, 6):
        nan_at, fl, loss = run(seed, 20, None, 0.1, thr)
        print(f"RNN relu T20 SGD0.1 seed{seed} thr={thr}: nan_at={nan_at} flagged={fl[:6]}{'...' if len(fl)>6 else ''} n_flagged={len(fl)} final loss={loss:.3g}")

# EMA contamination: m_spike_s0 log-norm series with a second x1e4-like spike injected 20 steps after the first
d = np.load('out/m_spike_s0.npz'); t = np.log(d['total64'].copy())
t2 = t.copy(); t2[170] += t[150] - np.median(t[130:150])  # same log jump as the real spike
for upd in (True, False):
    alpha, warm, thr = 0.02, 50, 8
    mu, var = t2[0], 0.0; zs = {}
    for s in range(1, len(t2)):
        sd = math.sqrt(var); z = (t2[s] - mu) / sd if sd > 0 else 0
        zs[s] = z
        if upd or not (s >= warm and z > thr):
            dd = t2[s] - mu; mu += alpha * dd; var = (1 - alpha) * (var + alpha * dd * dd)
    print(f"update EMA on flagged step={upd}: z@150={zs[150]:.3g} z@170 (second identical spike)={zs[170]:.3g}, max z 152..169={max(zs[s] for s in range(152,170)):.3g}, std after={math.sqrt(var):.3g}")
