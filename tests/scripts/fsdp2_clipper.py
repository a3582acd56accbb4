"""One rank of an FSDP2 (``fully_shard``) run on CPU/gloo that clips sharded gradients.

Launched once per rank by ``tests/test_adaptive_clipper.py`` with torchrun's variables::

    python fsdp2_clipper.py OUT_DIR

Every rank builds the same small MLP, keeps an unsharded copy, shards the original with
``fully_shard`` (each Linear, then the root: DTensor parameters sharded along dim 0,
unevenly), runs backward on its half of a fixed batch and then applies the clipping
primitives of ``lightning_gradguard.clipping`` to the sharded gradients, using the norms
of the gradguard snapshot: a total-norm clip to half the norm, a value clip and AGC
(rows of the Linear weights, whole-tensor norms for biases and the LayerNorm gain, which
are sharded across the ranks). The results, gathered with ``full_tensor()``, and the same
operations done by hand in float64 on the unsharded copy go to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_gradguard.clipping import UnitwiseClip, clip_by_norm_, clip_by_value_
from lightning_gradguard.stats import ParamSet, take_snapshot

BATCH, IN = 8, 6
AGC_CLIPPING, AGC_EPS = 0.05, 1e-3


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, 7)
        self.hidden = nn.Linear(7, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.hidden(torch.tanh(self.inp(x))))))


def unit_norms(t: torch.Tensor) -> torch.Tensor:
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t).reshape(1)
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def reference_agc(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    out = {}
    for name, g in grads.items():
        limit = AGC_CLIPPING * unit_norms(weights[name]).clamp_min(AGC_EPS)
        coef = (limit / unit_norms(g)).clamp(max=1.0)
        out[name] = (g * coef.view(-1, *([1] * (g.dim() - 1))) if g.dim() > 1 else g * coef).flatten().tolist()
    return out


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    x = torch.randn(BATCH, IN, generator=torch.Generator().manual_seed(1))
    y = torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(2))
    nn.functional.mse_loss(reference(x), y).backward()
    ref_grads = {n: p.grad.double() for n, p in reference.named_parameters()}
    ref_weights = {n: p.detach().double() for n, p in reference.named_parameters()}
    ref_total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in ref_grads.values()])).item()
    ref_max = max(g.abs().max().item() for g in ref_grads.values())

    mesh = init_device_mesh("cpu", (world,))
    for sub in (model.inp, model.hidden, model.head):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    half = BATCH // world
    nn.functional.mse_loss(model(x[rank * half : (rank + 1) * half]), y[rank * half : (rank + 1) * half]).backward()

    params = ParamSet.from_module(model)
    saved = [p.grad.to_local().clone() for p in params.params]

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params.params, saved):
                p.grad.to_local().copy_(s)

    def full() -> dict[str, list[float]]:
        return {n: p.grad.full_tensor().double().flatten().tolist() for n, p in zip(params.names, params.params)}

    result: dict = {"rank": rank, "sharded": params.sharded, "cases": {}, "reference": {}}
    grads = [p.grad for p in params.params]

    snap = take_snapshot(params)
    threshold = 0.5 * snap.total_norm.item()
    clip_by_norm_(grads, snap.total_norm, threshold)
    result["cases"]["norm"] = full()
    result["threshold"] = threshold
    flat = [v for values in result["cases"]["norm"].values() for v in values]
    result["norm_after"] = float(torch.linalg.vector_norm(torch.tensor(flat, dtype=torch.float64)))
    coef = 0.5 * snap.total_norm.item() / ref_total
    result["reference"]["norm"] = {n: (g * coef).flatten().tolist() for n, g in ref_grads.items()}

    restore()
    bound = 0.3 * ref_max
    clip_by_value_(grads, bound)
    result["cases"]["value"] = full()
    result["reference"]["value"] = {n: g.clamp(-bound, bound).flatten().tolist() for n, g in ref_grads.items()}

    restore()
    snap = take_snapshot(params)
    UnitwiseClip(params, clipping=AGC_CLIPPING, eps=AGC_EPS).clip_(snap.norms, finite=snap.all_finite)
    result["cases"]["agc"] = full()
    result["reference"]["agc"] = reference_agc(ref_weights, ref_grads)

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without running C++ static destructors: a c10d/gloo helper thread still
    # joinable at interpreter teardown aborts the process now and then ("terminate
    # called without an active exception", exit -6) after all the work is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
