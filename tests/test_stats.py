"""The Trainer-free snapshot engine: groupings, norms, finiteness, scale."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_gradguard.stats import Grouping, ParamSet, reduce_norms, take_snapshot, tensor_stats


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))  # owned by the root module
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.head(self.encoder(x * self.scale)))


def _backward(model, seed=0):
    torch.manual_seed(seed)
    model(torch.randn(5, 3)).pow(2).sum().backward()


def test_module_grouping_in_registration_order_without_frozen():
    params = ParamSet.from_module(Net())
    assert params.names == (
        "scale",
        "encoder.0.weight",
        "encoder.0.bias",
        "encoder.2.weight",
        "encoder.2.bias",
        "head.weight",
        "head.bias",
    )
    g = Grouping.build(params)
    assert g.names == ("root", "encoder.0", "encoder.2", "head")
    assert g.index == (0, 1, 1, 2, 2, 3, 3)
    assert g.members[1] == ("encoder.0.weight", "encoder.0.bias")


def test_other_groupings():
    params = ParamSet.from_module(Net())
    assert Grouping.build(params, group_by="parameter").names == params.names
    assert Grouping.build(params, group_by="depth", group_depth=1).names == ("root", "encoder", "head")
    assert Grouping.build(params, group_by="total").names == ("all",)
    pat = Grouping.build(params, group_by="pattern", group_patterns={"weights": r"weight$", "enc": "encoder"})
    assert pat.names == ("other", "weights", "enc")
    assert pat.index == (0, 1, 2, 1, 2, 1, 0)


def test_reserved_group_name_is_renamed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.total = nn.Linear(2, 2)

    assert Grouping.build(ParamSet.from_module(M())).names == ("total_",)


def test_from_optimizer_keeps_module_order_and_names_strays():
    net = Net()
    stray = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [net.head.weight, stray]}, {"params": [net.encoder[0].weight]}], lr=0.1)
    params = ParamSet.from_optimizer(opt, net)
    assert params.names == ("encoder.0.weight", "head.weight", "param_groups.0.1")
    assert params.params[2] is stray


def test_norms_match_vector_norm_and_missing_grads_are_zero():
    net = Net()
    _backward(net)
    net.encoder[2].bias.grad = None  # e.g. an unused parameter
    params = ParamSet.from_module(net)
    grouping = Grouping.build(params)
    snap = take_snapshot(params)
    stats = snap.grouped(grouping)
    host = stats.to_host()
    for name, members in zip(grouping.names, grouping.members):
        grads = [p.grad for n, p in net.named_parameters() if n in members and p.grad is not None]
        want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
        assert host.group_norms[name] == pytest.approx(want, rel=1e-5)
    every = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    assert host.total_norm == pytest.approx(torch.linalg.vector_norm(every).item(), rel=1e-5)
    assert stats.total_norm.item() == pytest.approx(host.total_norm, rel=1e-5)
    assert host.max_abs == pytest.approx(every.abs().max().item())
    assert snap.has_grad[params.names.index("encoder.2.bias")] is False
    assert snap.norms[params.names.index("encoder.2.bias")].item() == 0.0
    assert host.all_finite and stats.all_finite.item()
    assert snap.grouped(grouping) is stats  # aggregated once per grouping


def test_no_grad_at_all():
    params = ParamSet.from_module(Net())
    stats = take_snapshot(params).grouped(Grouping.build(params))
    assert stats.present == (False, False, False, False)
    host = stats.to_host()
    assert host.total_norm == 0.0 and host.all_finite


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_groups_are_named_in_order(bad):
    net = Net()
    _backward(net)
    net.head.bias.grad[0] = bad
    net.encoder[2].weight.grad[1, 1] = bad
    params = ParamSet.from_module(net)
    stats = take_snapshot(params).grouped(Grouping.build(params))
    host = stats.to_host()
    assert host.nonfinite_groups == ("encoder.2", "head")
    assert not host.all_finite
    assert not stats.all_finite.item()
    assert stats.nonfinite.tolist() == [False, False, True, True]
    assert not math.isfinite(host.total_norm)
    assert math.isfinite(host.group_norms["encoder.0"])


def test_scale_is_divided_out():
    net = Net()
    _backward(net)
    params = ParamSet.from_module(net)
    grouping = Grouping.build(params)
    plain = take_snapshot(params).grouped(grouping).to_host(max_abs=True)
    for p in net.parameters():
        if p.grad is not None:
            p.grad.mul_(65536.0)
    scaled = take_snapshot(params, scale=torch.tensor(65536.0)).grouped(grouping).to_host()
    assert scaled.total_norm == pytest.approx(plain.total_norm, rel=1e-6)
    assert scaled.max_abs == pytest.approx(plain.max_abs, rel=1e-6)
    for k, v in plain.group_norms.items():
        assert scaled.group_norms[k] == pytest.approx(v, rel=1e-6)


def test_huge_scaled_norm_does_not_overflow_the_squares():
    # Two tensors of norm 1.5e19: each square fits in float32 (max 3.4e38), their sum
    # does not. Dividing the scale out before squaring keeps the total exact.
    ps = (nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4)))
    for p in ps:
        p.grad = torch.full((4,), 0.75e19)
    params = ParamSet(params=ps, names=("a.w", "b.w"))
    host = take_snapshot(params, scale=1e18).grouped(Grouping.build(params, group_by="total")).to_host()
    assert host.total_norm == pytest.approx(15.0 * math.sqrt(2.0), rel=1e-6)


def test_out_of_range_tensor_norms_are_exact_not_zero_or_inf():
    # float32 sums of squares would underflow below ~1e-22 per element and overflow above a
    # norm of ~1.8e19; the norms accumulate in float64, so both are exact.
    tiny = torch.full((16,), 1e-25)
    huge = torch.full((16,), 1e20)
    norms, maxes = tensor_stats([tiny, huge, torch.zeros(3)])
    assert norms[0].item() == pytest.approx(4e-25, rel=1e-6)
    assert norms[1].item() == pytest.approx(4e20, rel=1e-6)
    assert norms[2].item() == 0.0  # a true zero stays zero
    assert maxes.tolist() == pytest.approx([1e-25, 1e20, 0.0], rel=1e-6)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-18, 1.0, 1e18, 1e30])
def test_group_aggregation_neither_underflows_nor_overflows(magnitude):
    norms = torch.tensor([3.0, 4.0, 12.0, 5.0]) * magnitude
    out = reduce_norms(norms, torch.tensor([0, 0, 1, 1]), 2)
    assert out.tolist() == pytest.approx([5.0 * magnitude, 13.0 * magnitude], rel=1e-6)


def test_group_aggregation_propagates_nan_and_inf():
    out = reduce_norms(torch.tensor([1.0, math.nan, math.inf, 2.0, 0.0]), torch.tensor([0, 0, 1, 1, 2]), 3)
    assert math.isnan(out[0].item()) and math.isinf(out[1].item()) and out[2].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_gradients(dtype):
    p = nn.Parameter(torch.zeros(64, dtype=dtype))
    # fp16 max is 65504: the norm of these values exceeds it but the elements do not
    p.grad = torch.full((64,), 30000.0, dtype=dtype)
    params = ParamSet(params=(p,), names=("w",))
    host = take_snapshot(params).grouped(Grouping.build(params, group_by="parameter")).to_host()
    want = torch.linalg.vector_norm(p.grad.double()).item()
    assert host.total_norm == pytest.approx(want, rel=1e-3 if dtype != torch.float64 else 1e-6)
    assert host.all_finite


def test_to_host_brings_extras_in_the_same_copy():
    net = Net()
    _backward(net)
    params = ParamSet.from_module(net)
    stats = take_snapshot(params).grouped(Grouping.build(params))
    host = stats.to_host([torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])])
    assert host.extras == ([1.0, 2.0], [3.0])


def test_bad_grouping_arguments():
    params = ParamSet.from_module(Net())
    with pytest.raises(ValueError, match="group_by"):
        Grouping.build(params, group_by="layers")
    with pytest.raises(ValueError, match="group_depth"):
        Grouping.build(params, group_by="depth", group_depth=0)
    with pytest.raises(ValueError, match="group_patterns"):
        Grouping.build(params, group_by="pattern", group_patterns={"total": "x"})
    with pytest.raises(ValueError, match="names"):
        ParamSet(params=(nn.Parameter(torch.zeros(1)),), names=())
    other = Grouping.build(ParamSet.from_module(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="grouping"):
        take_snapshot(params).grouped(other)


shapes = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**16), log_scale=st.floats(-15, 15), none_mask=st.integers(0, 63))
def test_property_tensor_stats_match_reference(shapes, seed, log_scale, none_mask):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*s, generator=g) * (10.0**log_scale) for s in shapes]
    tensors = [None if (none_mask >> i) & 1 else t for i, t in enumerate(tensors)]
    sq, mx = tensor_stats(tensors)
    for i, t in enumerate(tensors):
        if t is None:
            assert sq[i].item() == 0.0 and mx[i].item() == 0.0
            continue
        want = torch.linalg.vector_norm(t.double()).item()
        assert sq[i].item() == pytest.approx(want, rel=1e-5)
        assert mx[i].item() == pytest.approx(t.abs().max().item(), rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(n_params=st.integers(1, 8), n_groups=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_property_group_norms_compose_to_total(n_params, n_groups, seed):
    g = torch.Generator().manual_seed(seed)
    ps = tuple(nn.Parameter(torch.zeros(3)) for _ in range(n_params))
    for p in ps:
        p.grad = torch.randn(3, generator=g)
    names = tuple(f"m{torch.randint(n_groups, (1,), generator=g).item()}.p{i}" for i in range(n_params))
    params = ParamSet(params=ps, names=names)
    host = take_snapshot(params).grouped(Grouping.build(params)).to_host()
    total = math.sqrt(sum(v * v for v in host.group_norms.values()))
    assert host.total_norm == pytest.approx(total, rel=1e-6)
    every = torch.cat([p.grad for p in ps])
    assert host.total_norm == pytest.approx(torch.linalg.vector_norm(every).item(), rel=1e-5)
