"""Gradient-statistics recorder used by all experiments (plain PyTorch loops)."""
import json
import math
import os
import time

import numpy as np
import torch
from torch import nn

OUT = os.environ.get("GRADGUARD_STUDY_OUT", "runs/alarm_defaults")
os.makedirs(OUT, exist_ok=True)
torch.set_num_threads(1)


def groups_of(model):
    """Parameters grouped by owning module, in registration order."""
    order, groups = [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else "<root>"
        if owner not in groups:
            groups[owner] = []
            order.append(owner)
        groups[owner].append((name, p))
    return order, groups


class Recorder:
    def __init__(self, model, tag):
        self.model = model
        self.tag = tag
        self.order, self.groups = groups_of(model)
        self.pnames = [n for g in self.order for n, _ in self.groups[g]]
        self.params = [p for g in self.order for _, p in self.groups[g]]
        self.gidx = []
        for gi, g in enumerate(self.order):
            self.gidx += [gi] * len(self.groups[g])
        self.gidx = np.array(self.gidx)
        self.rows = {k: [] for k in ("gnorm64", "gnorm32", "gmax", "pmax", "pnorm64",
                                     "total64", "total32", "maxabs", "loss", "gfinite")}

    @torch.no_grad()
    def record(self, loss):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        n32 = torch.stack(torch._foreach_norm(grads)).double().numpy()
        n64 = torch.stack(torch._foreach_norm([g.double() for g in grads])).numpy()
        pmax = torch.stack(torch._foreach_norm(grads, float("inf"))).double().numpy()
        G = len(self.order)
        gn64 = np.sqrt(np.bincount(self.gidx, weights=n64 ** 2, minlength=G))
        gn32 = np.sqrt(np.bincount(self.gidx, weights=n32 ** 2, minlength=G))
        gmax = np.zeros(G)
        np.maximum.at(gmax, self.gidx, pmax)
        fin = np.isfinite(n64) & np.isfinite(pmax)
        gfin = np.ones(G, bool)
        np.logical_and.at(gfin, self.gidx, fin)
        r = self.rows
        r["gnorm64"].append(gn64); r["gnorm32"].append(gn32); r["gmax"].append(gmax)
        r["pmax"].append(pmax); r["pnorm64"].append(n64)
        r["total64"].append(math.sqrt(float((n64 ** 2).sum())))
        r["total32"].append(float(np.sqrt((n32 ** 2).sum())))
        r["maxabs"].append(float(pmax.max()))
        r["loss"].append(float(loss))
        r["gfinite"].append(gfin)

    def save(self, **meta):
        arrs = {k: np.array(v) for k, v in self.rows.items()}
        np.savez(os.path.join(OUT, self.tag + ".npz"), **arrs)
        meta.update(groups=self.order, params=self.pnames,
                    numel=[int(p.numel()) for p in self.params])
        with open(os.path.join(OUT, self.tag + ".json"), "w") as f:
            json.dump(meta, f)


def train(tag, model, batch_fn, loss_fn, steps, opt=None, lr=1e-3, hook=None, meta=None):
    opt = opt or torch.optim.Adam(model.parameters(), lr=lr)
    rec = Recorder(model, tag)
    t0 = time.time()
    for step in range(steps):
        x, y = batch_fn(step)
        if hook is not None:
            x = hook(step, x)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        rec.record(loss.item())
        if not math.isfinite(rec.rows["total64"][-1]):
            break  # first non-finite gradient recorded; stop
        opt.step()
    m = dict(meta or {}, steps=len(rec.rows["loss"]), seconds=time.time() - t0)
    rec.save(**m)
    print(f"{tag}: {steps} steps {time.time()-t0:.1f}s loss {rec.rows['loss'][0]:.3g} -> {rec.rows['loss'][-1]:.3g}", flush=True)
    return rec


# ---------------- tasks -----------------
def spirals(n, noise=0.1, gen=None):
    t = torch.rand(n, generator=gen) * 3 * math.pi + 0.5
    cls = torch.randint(0, 2, (n,), generator=gen)
    r = t / (3 * math.pi + 0.5)
    ang = t + cls * math.pi
    x = torch.stack([r * torch.cos(ang), r * torch.sin(ang)], 1)
    x = x + noise * 0.1 * torch.randn(n, 2, generator=gen)
    return x * 2, cls


def spiral_batches(bs=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda step: spirals(bs, gen=g)


# ---------------- models ----------------
def mlp(depth, width=32, act="relu", init="default", din=2, dout=2):
    """depth = number of Linear layers (incl. input and output layer)."""
    A = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[act]
    layers = []
    dims = [din] + [width] * (depth - 1) + [dout]
    for i in range(depth):
        lin = nn.Linear(dims[i], dims[i + 1])
        if init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < depth - 1:
            layers.append(A())
    return nn.Sequential(*layers)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.lin = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.lin.weight, nonlinearity="relu")
        nn.init.zeros_(self.lin.bias)

    def forward(self, h):
        return h + torch.relu(self.lin(self.norm(h)))


class ResMLP(nn.Module):
    """Registration order == depth order: inp, blocks.0.norm, blocks.0.lin, ..., head."""
    def __init__(self, depth=20, width=32, din=2, dout=2):
        super().__init__()
        self.inp = nn.Linear(din, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, dout)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))
