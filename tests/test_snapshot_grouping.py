"""``group_by="auto"``: module groups, merged into at most ``AUTO_MAX_GROUPS`` consecutive spans for big models."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import loader, make_trainer, read_scalars
from torch import nn

from lightning_gradguard import GradientNormLogger, _validation
from lightning_gradguard.stats import AUTO_MAX_GROUPS, ForwardOrder, Grouping, ParamSet, take_snapshot


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.mlp(torch.tanh(self.attn(x)))


class Deep(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.head = nn.Linear(4, 1)  # registered first, runs last
        self.embed = nn.Linear(3, 4)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _auto(depth: int) -> tuple[Deep, ParamSet, Grouping]:
    net = Deep(depth)
    loss = net(torch.randn(2, 3)).sum()
    loss.backward()
    params = ParamSet.from_module(net)
    order = ForwardOrder.of(loss, params)
    return net, params, Grouping.build(params, group_by="auto", order=order)


def test_auto_is_a_choice():
    assert "auto" in _validation.GROUP_BY_CHOICES


def test_auto_keeps_module_groups_for_small_models():
    net, params, auto = _auto(4)
    module = Grouping.build(params, group_by="module", order=auto_order(net, params))
    assert auto.names == module.names
    assert auto.names[0] == "embed" and auto.names[-1] == "head"


def auto_order(net: Deep, params: ParamSet) -> ForwardOrder:
    return ForwardOrder.of(net(torch.randn(2, 3)).sum(), params)


def test_auto_merges_consecutive_layers_of_a_deep_model_into_named_spans():
    _, params, auto = _auto(100)  # 202 module groups
    assert len(auto) <= AUTO_MAX_GROUPS
    assert auto.ordered_by == "forward"
    # every parameter is in exactly one group, and groups cover consecutive layers in forward order
    flat = [m for members in auto.members for m in members]
    assert sorted(flat) == sorted(params.names)
    assert len(auto) == 51  # embed, 100 blocks and head, two a group
    assert auto.names[0] == "embed-blocks.0"
    assert auto.names[1] == "blocks.1-2"
    assert auto.names[-1] == "blocks.99-head"
    assert set(auto.members[1]) == {
        f"blocks.{i}.{m}.{w}" for i in (1, 2) for m in ("attn", "mlp") for w in ("weight", "bias")
    }
    assert len(set(auto.names)) == len(auto.names)


def test_auto_keeps_whole_blocks_when_they_fit():
    auto = _auto(40)[2]  # 82 module groups, 42 blocks-level ones
    assert auto.names == ("embed", *(f"blocks.{i}" for i in range(40)), "head")


def test_auto_groups_aggregate_like_any_grouping():
    net, params, auto = _auto(100)
    host = take_snapshot(params).grouped(auto).to_host()
    want = {}
    for name, members in zip(auto.names, auto.members):
        grads = [dict(net.named_parameters())[m].grad for m in members]
        want[name] = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads])).item()
    assert list(host.group_norms) == list(auto.names)
    for name, value in host.group_norms.items():
        assert value == pytest.approx(want[name], rel=1e-5)


def test_auto_takes_no_depth_or_patterns():
    params = ParamSet.from_module(Deep(2))
    with pytest.raises(ValueError, match="group_depth"):
        Grouping.build(params, group_by="auto", group_depth=2)


class DeepModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Deep(100)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0][:, :3]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_logger_with_auto_groups_logs_at_most_auto_max_groups(tmp_path):
    trainer = make_trainer(tmp_path, [GradientNormLogger(group_by="auto")], max_steps=2)
    trainer.fit(DeepModule(), loader())
    tags = [t for t in read_scalars(trainer.logger.log_dir) if t.startswith("grad_norm/") and t != "grad_norm/total"]
    assert 0 < len(tags) <= AUTO_MAX_GROUPS
    assert "grad_norm/net.blocks.1-2" in tags, tags
