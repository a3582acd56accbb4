"""Grid over exploding-RNN set-ups: which ones explode during training?"""
import math, torch, torch.nn.functional as F
from torch import nn
torch.set_num_threads(1)

class RNNReg(nn.Module):
    def __init__(self, c, nonlin="relu"):
        super().__init__()
        self.rnn = nn.RNN(5, 10, nonlinearity=nonlin, batch_first=True)
        with torch.no_grad():
            if c is not None:
                self.rnn.weight_hh_l0.fill_(c)
        self.head = nn.Linear(10, 1)
    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)

def go(c, T, optname, lr, steps=300, seed=0):
    torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
    m = RNNReg(c)
    opt = (torch.optim.Adam if optname == "adam" else torch.optim.SGD)(m.parameters(), lr=lr)
    norms, losses = [], []
    for s in range(steps):
        x = torch.randn(64, T, 5, generator=g)
        y = x[:, :, 0].sum(1) / math.sqrt(T)
        opt.zero_grad(); l = F.mse_loss(m(x), y); l.backward()
        n = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]).item()
        norms.append(n); losses.append(l.item())
        if not math.isfinite(n):
            break
        opt.step()
    fin = [n for n in norms if math.isfinite(n)]
    nan_at = next((i for i, n in enumerate(norms) if not math.isfinite(n)), None)
    med0 = sorted(fin[:50])[len(fin[:50])//2] if fin else float('nan')
    print(f"c={c} T={T} {optname} lr={lr}: first-norm {norms[0]:.3g} med(0-50) {med0:.3g} max {max(fin) if fin else float('nan'):.3g} "
          f"argmax {fin.index(max(fin)) if fin else -1} nan_at {nan_at} loss {losses[0]:.3g}->{losses[-1]:.3g}", flush=True)

for c in [None, 0.1, 0.12, 0.15, 0.2]:
    for T in [20, 50]:
        for optname, lr in [("adam", 1e-3), ("adam", 1e-2), ("sgd", 1e-2), ("sgd", 1e-1)]:
            go(c, T, optname, lr)
