"""One rank of an FSDP2 (``fully_shard``) run on CPU/gloo that records gradguard snapshots.

Launched once per rank by ``tests/test_distributed.py`` with the usual torchrun variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)::

    python fsdp2_snapshot.py OUT_DIR [--head-out N]

Every rank builds the same small MLP, keeps an unsharded copy as a reference, shards the
original with ``fully_shard`` (each Linear, then the root), runs forward/backward on its
own slice of a fixed global batch, and then takes several gradguard snapshots:
plain, with a loss scale, and with a NaN or an Inf written into one rank's local gradient
shard. Nothing is asserted here: the results, together with reference norms computed
from the unsharded copy and from ``grad.full_tensor()``, go to ``OUT_DIR/rank<r>.json``
and the test compares them.

Shard sizes: the Linear layers have 7, 5 and ``--head-out`` output features, so with two
ranks their weights split 4/3, 3/2 and (for ``--head-out 1``) 1/0, the last leaving rank 1
with an empty local gradient.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_gradguard.stats import Grouping, ParamSet, take_snapshot

GLOBAL_BATCH = 8
IN_FEATURES = 6


class MLP(nn.Module):
    def __init__(self, head_out: int) -> None:
        super().__init__()
        self.inp = nn.Linear(IN_FEATURES, 7)
        self.hidden = nn.Linear(7, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, head_out)
        self.norm.bias.requires_grad_(False)  # the frozen parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        x = self.norm(torch.tanh(self.hidden(x)))
        return self.head(x)


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded gradients by parameter name (a collective for DTensor gradients)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad
            if hasattr(g, "full_tensor"):
                g = g.full_tensor()
            out[name] = g.detach().double()
    return out


def reference_norms(grads: dict[str, torch.Tensor], grouping: Grouping) -> dict[str, float]:
    """Group norms, total norm and max |g| of full gradients, in float64."""
    out: dict[str, float] = {}
    for gname, members in zip(grouping.names, grouping.members):
        flat = torch.cat([grads[m].flatten() for m in members])
        out[gname] = torch.linalg.vector_norm(flat).item()
    flat = torch.cat([g.flatten() for g in grads.values()])
    out["total"] = torch.linalg.vector_norm(flat).item()
    out["max_abs"] = flat.abs().max().item()
    return out


def host_record(stats) -> dict:
    return {
        "total": stats.total_norm,
        "groups": stats.group_norms,
        "max_abs": stats.max_abs,
        "nonfinite_groups": list(stats.nonfinite_groups),
        "all_finite": stats.all_finite,
    }


def poke_local_grad(model: nn.Module, name: str, value: float) -> bool:
    """Write ``value`` into the first element of this rank's local shard of ``name``'s grad."""
    local = dict(model.named_parameters())[name].grad.to_local()
    if local.numel() == 0:
        return False
    with torch.no_grad():
        local.view(-1)[0] = value
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--head-out", type=int, default=3)
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict = {"rank": rank, "world_size": world}

    torch.manual_seed(0)
    model = MLP(args.head_out)
    reference = copy.deepcopy(model)  # unsharded, same weights
    x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    y = torch.randn(GLOBAL_BATCH, args.head_out, generator=torch.Generator().manual_seed(2))

    # Reference: the whole global batch through the unsharded copy. FSDP2 averages the
    # ranks' gradients, and the ranks' halves have equal size, so the two agree.
    nn.functional.mse_loss(reference(x), y).backward()
    unsharded = {n: p.grad.double() for n, p in reference.named_parameters() if p.requires_grad}

    mesh = init_device_mesh("cpu", (world,))
    for sub in (model.inp, model.hidden, model.head):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)

    per_rank = GLOBAL_BATCH // world
    xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    nn.functional.mse_loss(model(xs), ys).backward()

    params = ParamSet.from_module(model)
    result["names"] = list(params.names)
    result["sharded"] = params.sharded
    result["local_numel"] = {n: p.grad.to_local().numel() for n, p in zip(params.names, params.params)}
    result["grad_types"] = sorted({type(p.grad).__name__ for p in params.params})
    by_module = Grouping.build(params, group_by="module")
    by_param = Grouping.build(params, group_by="parameter")
    full = full_grads(model)

    result["reference"] = {
        "unsharded_module": reference_norms(unsharded, by_module),
        "unsharded_parameter": reference_norms(unsharded, by_param),
        "full_tensor_module": reference_norms(full, by_module),
    }

    snap = take_snapshot(params)
    result["snapshot"] = {
        "module": host_record(snap.grouped(by_module).to_host()),
        "parameter": host_record(snap.grouped(by_param).to_host()),
        "snapshot_total": snap.total_norm.item(),
        "snapshot_all_finite": bool(snap.all_finite.item()),
    }
    result["scaled"] = {
        "1024": host_record(take_snapshot(params, scale=1024.0).grouped(by_module).to_host()),
        "tensor_0.25": host_record(take_snapshot(params, scale=torch.tensor(0.25)).grouped(by_module).to_host()),
    }

    # Non-finite values in one rank's local shard only. Gradients are restored after each
    # case so that the cases do not mix.
    saved = {n: p.grad.to_local().clone() for n, p in zip(params.names, params.params)}

    def restore() -> None:
        with torch.no_grad():
            for n, p in zip(params.names, params.params):
                p.grad.to_local().copy_(saved[n])

    # Every parameter, every rank: where a NaN lands in the all-reduced vector matters.
    cases = {
        f"{kind}:{pname}:rank{target}": (pname, target, value)
        for kind, value in (("nan", math.nan), ("inf", math.inf))
        for pname in params.names
        for target in range(world)
    }
    result["nonfinite"] = {}
    for case, (pname, target, value) in cases.items():
        poked = poke_local_grad(model, pname, value) if rank == target else False
        record = host_record(take_snapshot(params).grouped(by_module).to_host())
        record["poked_here"] = poked
        result["nonfinite"][case] = record
        restore()

    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
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
