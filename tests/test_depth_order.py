"""Depth is the order in which layers run, not the order in which ``__init__`` registers them."""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradguard import VanishExplodeAlarm
from lightning_gradguard.callbacks import _session
from lightning_gradguard.stats import ForwardOrder, Grouping, ParamSet, record_forward_order

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from demo import Classifier, two_spirals


class HeadFirst(nn.Module):
    """A deep sigmoid body whose head is registered before it (a common way to write a model)."""

    def __init__(self, depth: int = 12, width: int = 32):
        super().__init__()
        self.head = nn.Linear(width, 2)
        layers: list[nn.Module] = [nn.Linear(2, width), nn.Sigmoid()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.head(self.body(x))


class DecoderFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(3, 4)
        self.encoder = nn.Linear(4, 3)

    def forward(self, x):
        return self.decoder(torch.relu(self.encoder(x)))


class StemAfterBranch(nn.Module):
    """``stem`` is registered first but runs after ``branch``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.branch = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.stem(torch.tanh(self.branch(x))))


class TiedLM(nn.Module):
    """Output projection tied to the embedding, registered before it."""

    def __init__(self, vocab: int = 11, d: int = 6):
        super().__init__()
        self.proj = nn.Linear(d, vocab, bias=False)
        self.block = nn.Linear(d, d)
        self.emb = nn.Embedding(vocab, d)
        self.proj.weight = self.emb.weight

    def forward(self, tokens):
        return self.proj(torch.relu(self.block(self.emb(tokens))))


def _order(model: nn.Module, loss: torch.Tensor) -> tuple[str, ...]:
    params = ParamSet.from_module(model)
    return Grouping.build(params, order=ForwardOrder.of(loss, params)).names


def test_groups_follow_the_forward_pass():
    m = DecoderFirst()
    assert [n for n, _ in m.named_children()] == ["decoder", "encoder"]
    assert _order(m, m(torch.randn(2, 4)).sum()) == ("encoder", "decoder")
    s = StemAfterBranch()
    assert _order(s, s(torch.randn(2, 4)).sum()) == ("branch", "stem", "out")
    h = HeadFirst(depth=3, width=4)
    names = _order(h, h(torch.randn(2, 2)).sum())
    assert names[0] == "body.0" and names[-1] == "head"
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))  # already in order: unchanged
    assert _order(seq, seq(torch.randn(1, 2)).sum()) == ("0", "2")


def test_a_tied_weight_is_placed_where_it_is_first_used():
    m = TiedLM()
    params = ParamSet.from_module(m)
    assert params.names[0] == "proj.weight"  # named after the module that registered it first
    grouping = Grouping.build(params, order=ForwardOrder.of(m(torch.tensor([[1, 2, 3]])).sum(), params))
    assert grouping.names == ("proj", "block")  # the tied weight runs first, in the embedding
    assert grouping.ordered_by == "forward"


def test_parameters_the_graph_does_not_reach_keep_their_registration_neighbour_and_refresh():
    m = StemAfterBranch()
    m.stem.requires_grad_(False)  # frozen: not in the graph
    params = ParamSet.from_module(m, include_frozen=True)
    loss = m(torch.randn(2, 4)).sum()
    assert record_forward_order(params, loss)
    g = Grouping.build(params)
    assert g.names == ("stem", "branch", "out")  # after the group registered before it (none)
    assert g.unplaced == ("stem",)
    loss.backward()
    assert not record_forward_order(params, loss)  # nothing new has a gradient: no second walk
    m.stem.requires_grad_(True)  # unfrozen: the next loss places it
    m.zero_grad()
    loss = m(torch.randn(2, 4)).sum()
    loss.backward()
    assert record_forward_order(params, loss)
    assert Grouping.build(params).names == ("branch", "stem", "out")


def test_without_a_graph_the_order_is_registration_order():
    m = DecoderFirst()
    params = ParamSet.from_module(m)
    with torch.no_grad():
        loss = m(torch.randn(2, 4)).sum()
    order = ForwardOrder.of(loss, params)
    assert not order.traced
    g = Grouping.build(params, order=order)
    assert g.names == ("decoder", "encoder") and g.ordered_by == "untraced"
    assert Grouping.build(params).ordered_by == "registration"  # no order looked for
    assert not record_forward_order(params, None)


def test_an_untraced_order_is_said_in_the_finding():
    from lightning_gradguard.diagnosis import Evidence, HealthDetector, build_finding
    from lightning_gradguard.stats import take_snapshot

    net = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(4, 4), nn.Sigmoid())])
    params = ParamSet.from_module(net)
    net(torch.randn(8, 4)).sum().backward()
    with torch.no_grad():
        untraced = Grouping.build(params, order=ForwardOrder.of(net(torch.randn(2, 4)).sum(), params))
    d = HealthDetector(patience=1, vanish_ratio=1.0001)
    stats = take_snapshot(params).grouped(untraced)
    reading = d.update(stats).to_host()
    assert reading.vanishing
    finding = build_finding("vanishing", 0, Evidence.collect(d, stats, reading))
    assert "registration order: the forward pass could not be traced" in finding.summary


def test_head_registered_first_deep_sigmoid_is_caught_in_a_real_fit(tmp_path):
    # In registration order the "shallowest" layer would be the head (a large gradient) and
    # the deep/shallow ratio below 1: the vanishing body went unseen.
    pl.seed_everything(0, verbose=False)
    model = Classifier(HeadFirst(depth=12, width=32), 1e-3)
    alarm = VanishExplodeAlarm(patience=10)
    trainer = make_trainer(tmp_path, [alarm], max_steps=20)
    with pytest.warns(UserWarning, match="vanishing gradients"):
        trainer.fit(model, DataLoader(two_spirals(n=512), batch_size=64, shuffle=True))
    finding = alarm.findings[0]
    assert finding.kind == "vanishing"
    assert finding.layers[0][0] == "net.body.0"  # the layer that runs first is named first
    assert "net.body.0" in finding.summary and "net.head" in finding.summary
    opt = trainer.optimizers[0]
    params = _session.param_set(trainer, model, opt)
    assert params.forward_order is not None and params.forward_order.traced
    names = alarm._grouping(params).names
    assert names[0] == "net.body.0" and names[-1] == "net.head"


def test_with_several_ranks_the_agreed_order_is_used_and_never_refreshed_alone():
    m = StemAfterBranch()
    m.stem.requires_grad_(False)
    params = ParamSet.from_module(m, include_frozen=True)
    calls = []

    def rank_zero(first_use):  # stands for a broadcast from rank zero: everything in registration order
        calls.append(list(first_use))
        return list(range(len(first_use)))

    loss = m(torch.randn(2, 4)).sum()
    assert record_forward_order(params, loss, agree=rank_zero)
    assert Grouping.build(params).names == ("stem", "branch", "out")  # rank zero's order, not this rank's
    m.stem.requires_grad_(True)
    loss = m(torch.randn(2, 4)).sum()
    loss.backward()
    assert not record_forward_order(params, loss, agree=rank_zero)  # no rank-local refresh (no collective)
    assert len(calls) == 1


def test_the_logger_alone_orders_its_layers_as_they_run(tmp_path):
    from lightning_gradguard import GradientNormLogger

    pl.seed_everything(0, verbose=False)
    model = Classifier(HeadFirst(depth=3, width=8), 1e-3)
    logger = GradientNormLogger(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [logger], max_steps=2)
    trainer.fit(model, DataLoader(two_spirals(n=64), batch_size=32))
    params = _session.param_set(trainer, model, trainer.optimizers[0])
    names = logger._grouping(params).names
    assert names == ("net.body.0", "net.body.2", "net.body.4", "net.head")


def test_a_parameter_the_graph_never_reaches_is_walked_for_once_only(monkeypatch):
    m = StemAfterBranch()
    params = ParamSet.from_module(m)
    loss = m.out(m.branch(torch.randn(2, 4))).sum()  # stem outside the graph, yet given a gradient below
    assert record_forward_order(params, loss)
    walks = []
    real = ForwardOrder.of
    monkeypatch.setattr(ForwardOrder, "of", classmethod(lambda cls, *a: walks.append(1) or real(*a)))
    for _ in range(3):
        m.stem.weight.grad = torch.ones_like(m.stem.weight)  # as a reentrant checkpoint would leave it
        record_forward_order(params, loss)
    assert len(walks) == 1


class InlineManual(pl.LightningModule):
    """Manual optimisation that holds no reference to its loss: ``manual_backward(self.loss(batch))``."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = HeadFirst(depth=3, width=8)
        self.held_at_step: list[bool] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
        opt.step()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.held_at_step.append(_session.session(self.trainer)._held_loss is not None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_loss_is_held_only_until_the_forward_order_is_known(tmp_path):
    # Holding every loss would keep its autograd graph alive until the next backward (and
    # free it inside a gradguard hook); it is held only while an order is still wanted, which
    # also covers a loss that nothing else holds at the optimizer step.
    from lightning_gradguard import GradientNormLogger

    pl.seed_everything(0, verbose=False)
    model = InlineManual()
    logger = GradientNormLogger(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [logger], max_steps=4)
    trainer.fit(model, DataLoader(two_spirals(n=128), batch_size=32))
    params = _session.param_set(trainer, model, trainer.optimizers[0])
    assert params.forward_order is not None and params.forward_order.traced
    assert logger._grouping(params).names == ("net.body.0", "net.body.2", "net.body.4", "net.head")
    assert model.held_at_step == [True, False, False, False]
    assert _session.session(trainer).last_loss is None  # nothing of ours keeps the last graph alive


def test_the_skip_count_survives_an_agreed_order_and_plain_arithmetic_is_no_skip():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            x = self.layers[0](x)
            for layer in self.layers[1:]:
                x = x + torch.relu(layer(x))
            return x.sum()

    class HandGelu(nn.Module):  # x + 0.044715 * x**3 adds a function of x to x, with no layer between
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            h = self.a(x)
            h = 0.5 * h * (1 + torch.tanh(0.79788456 * (h + 0.044715 * h**3)))
            return self.b(h).sum()

    net = Residual()
    params = ParamSet.from_module(net)
    assert record_forward_order(params, net(torch.randn(2, 4)), agree=lambda ranks: ranks)
    assert params.forward_order.skips == 2  # not reset by the agreed (broadcast) order
    gelu = HandGelu()
    assert ForwardOrder.of(gelu(torch.randn(2, 4)), ParamSet.from_module(gelu)).skips == 0
