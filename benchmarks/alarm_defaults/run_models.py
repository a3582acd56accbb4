"""Train every model of the study and record per-step gradient statistics.

usage: python run_models.py [names...]   (default: all)
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from harness import ResMLP, mlp, spiral_batches, train

ce = F.cross_entropy
mse = F.mse_loss
RUNS = {}


def run(fn):
    RUNS[fn.__name__] = fn
    return fn


# ---------------- healthy ----------------
@run
def a_resmlp20(seed=0):
    torch.manual_seed(seed)
    train(f"a_resmlp20_s{seed}", ResMLP(20, 32), spiral_batches(128, seed), ce, 300)


@run
def b_relu8(seed=0):
    torch.manual_seed(seed)
    train(f"b_relu8_s{seed}", mlp(8, 32, "relu", "he"), spiral_batches(128, seed), ce, 300)


class TinyTransformer(nn.Module):
    def __init__(self, vocab=1000, d=64, heads=4, ffn=256, layers=12, dropout=0.1, norm_first=False,
                 causal=True, seq=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=dropout, batch_first=True,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.causal = causal
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x):
        if self.causal:
            h = self.enc(self.emb(x), mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        else:
            h = self.enc(self.emb(x))
        return self.head(h)


def transformer_run(tag, seed, steps, task, norm_first=False, lr=1e-3, warmup=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyTransformer(norm_first=norm_first)

    def batch(step):
        ids = torch.randint(0, 1000, (16, 65), generator=g)
        if task == "next":  # the benchmark's reference: next token of fresh random ids (unlearnable)
            return ids[:, :-1], ids[:, 1:]
        x = ids[:, :-1]  # learnable: predict the previous token (position 0: itself)
        return x, torch.cat([x[:, :1], x[:, :-1]], 1)

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if warmup:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))

        class O:
            def zero_grad(self, set_to_none=True):
                opt.zero_grad(set_to_none=set_to_none)

            def step(self):
                opt.step()
                sched.step()
        o = O()
    else:
        o = opt
    train(f"{tag}_s{seed}", model, batch,
          lambda out, y: ce(out.reshape(-1, out.shape[-1]), y.reshape(-1)), steps, opt=o,
          meta=dict(task=task, norm_first=norm_first, lr=lr, warmup=warmup))


@run
def c_transformer12(seed=0, steps=300):  # the project's reference model and data
    transformer_run("c_tf_ref", seed, steps, "next")


@run
def c_tf_prev_postln(seed=0, steps=300):
    transformer_run("c_tf_prev_postln", seed, steps, "prev")


@run
def c_tf_prev_preln(seed=0, steps=300):
    transformer_run("c_tf_prev_preln", seed, steps, "prev", norm_first=True)


@run
def c_tf_prev_postln_lr1e4(seed=0, steps=300):
    transformer_run("c_tf_prev_postln_lr1e4", seed, steps, "prev", lr=1e-4)


@run
def c_tf_prev_postln_warm(seed=0, steps=300):
    transformer_run("c_tf_prev_postln_warm", seed, steps, "prev", warmup=100)


class LSTMReg(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1]).squeeze(-1)


@run
def d_lstm(seed=0, target="first"):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    def batch(step):
        x = torch.randn(128, 50, 1, generator=g)
        y = x[:, 0, 0] if target == "first" else x.sum((1, 2)) / 50 ** 0.5
        return x, y

    train(f"d_lstm_{target}_s{seed}", LSTMReg(), batch, mse, 300)


@run
def d_lstm_sum(seed=0):
    d_lstm(seed, "sum")


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 2))


@run
def e_cnn_bn(seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    def batch(step):
        x = torch.randn(64, 1, 16, 16, generator=g)
        y = (x[:, :, :8].mean((1, 2, 3)) > x[:, :, 8:].mean((1, 2, 3))).long()
        return x, y

    train(f"e_cnn_bn_s{seed}", cnn(), batch, ce, 300)


@run
def f_converged(seed=0, steps=2000):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    Y = X @ w * 0.5
    model = mlp(8, 32, "relu", "he", din=8, dout=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    class O:  # optimizer + scheduler stepping together
        def zero_grad(self, set_to_none=True):
            opt.zero_grad(set_to_none=set_to_none)

        def step(self):
            opt.step()
            sched.step()

    train(f"f_converged_s{seed}", model, lambda s: (X, Y), mse, steps, opt=O())


@run
def g_adam_wd_big(seed=0):
    torch.manual_seed(seed)
    model = mlp(8, 32, "relu", "he")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    train(f"g_adam_wd_big_s{seed}", model, spiral_batches(128, seed),
          lambda o, y: 1e3 * ce(o, y), 300, opt=opt)


@run
def g_adamw_big(seed=0):
    torch.manual_seed(seed)
    model = mlp(8, 32, "relu", "he")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    train(f"g_adamw_big_s{seed}", model, spiral_batches(128, seed),
          lambda o, y: 1e3 * ce(o, y), 300, opt=opt)


# ---------------- broken ----------------
def sig(depth, act, seed):
    torch.manual_seed(seed)
    train(f"{act}{depth}_s{seed}", mlp(depth, 32, act), spiral_batches(128, seed), ce, 300)


@run
def h_sigmoid20(seed=0):
    sig(20, "sigmoid", seed)


@run
def i_sigmoid10(seed=0):
    sig(10, "sigmoid", seed)


@run
def j_sigmoid5(seed=0):
    sig(5, "sigmoid", seed)


@run
def k_tanh20(seed=0):
    sig(20, "tanh", seed)


@run
def m_spike(seed=0, at=150, factor=1e4):
    torch.manual_seed(seed)
    train(f"m_spike_s{seed}", mlp(8, 32, "relu", "he"), spiral_batches(128, seed), ce, 300,
          hook=lambda step, x: x * factor if step == at else x, meta={"spike_step": at})


@run
def b_relu8_bs8(seed=0):  # healthy but noisy: batch 8
    torch.manual_seed(seed)
    train(f"b_relu8_bs8_s{seed}", mlp(8, 32, "relu", "he"), spiral_batches(8, seed), ce, 300)


@run
def b_relu8_sgdm(seed=0):  # healthy, SGD with momentum
    torch.manual_seed(seed)
    model = mlp(8, 32, "relu", "he")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(f"b_relu8_sgdm_s{seed}", model, spiral_batches(128, seed), ce, 300, opt=opt)


@run
def n_relu8_lr01(seed=0):  # broken: Adam lr 0.1 on the ReLU MLP (dead units?)
    torch.manual_seed(seed)
    train(f"n_relu8_lr01_s{seed}", mlp(8, 32, "relu", "he"), spiral_batches(128, seed), ce, 300, lr=0.1)


@run
def o_sigmoid50(seed=0):
    sig(50, "sigmoid", seed)


@run
def m_spike_x100(seed=0, at=150):  # smaller spike: batch x100
    torch.manual_seed(seed)
    train(f"m_spike_x100_s{seed}", mlp(8, 32, "relu", "he"), spiral_batches(128, seed), ce, 300,
          hook=lambda step, x: x * 100 if step == at else x, meta={"spike_step": at})


@run
def m_spike_res(seed=0, at=150):  # x1e4 spike on the residual+LayerNorm MLP (strong downward trend)
    torch.manual_seed(seed)
    train(f"m_spike_res_s{seed}", ResMLP(20, 32), spiral_batches(128, seed), ce, 300,
          hook=lambda step, x: x * 1e4 if step == at else x, meta={"spike_step": at})


class RNNReg(nn.Module):
    def __init__(self, c=None):
        super().__init__()
        self.rnn = nn.RNN(5, 10, nonlinearity="relu", batch_first=True)
        if c is not None:
            with torch.no_grad():
                self.rnn.weight_hh_l0.fill_(c)
        self.head = nn.Linear(10, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def rnn_run(tag, c, T, optname, lr, seed, steps=300):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = RNNReg(c)
    opt = (torch.optim.Adam if optname == "adam" else torch.optim.SGD)(model.parameters(), lr=lr)

    def batch(step):
        x = torch.randn(64, T, 5, generator=g)
        return x, x[:, :, 0].sum(1) / T ** 0.5

    train(f"{tag}_s{seed}", model, batch, mse, steps, opt=opt,
          meta=dict(c=c, T=T, opt=optname, lr=lr))


@run
def l_rnn_sgd01(seed=0):  # default init ReLU RNN, T=20, SGD lr 0.1: NaN after ~160 steps
    rnn_run("l_rnn_sgd01", None, 20, "sgd", 0.1, seed)


@run
def l_rnn_c01_sgd01(seed=0):  # weight_hh=0.1 (radius 1.0), T=20, SGD lr 0.1: NaN at ~50
    rnn_run("l_rnn_c01_sgd01", 0.1, 20, "sgd", 0.1, seed)


@run
def l_rnn_adam1e2_T50(seed=0):  # default init, T=50, Adam lr 1e-2: transient spike, no NaN
    rnn_run("l_rnn_adam1e2_T50", None, 50, "adam", 1e-2, seed)


@run
def l_rnn_c2_T10(seed=0):  # the seeds' example with ReLU: weight_hh=2.0, T=10
    rnn_run("l_rnn_c2_T10", 2.0, 10, "sgd", 1e-2, seed, steps=20)


if __name__ == "__main__":
    names = sys.argv[1:] or list(RUNS)
    for n in names:
        if ":" in n:
            n, s = n.split(":")
            for seed in range(int(s)):
                RUNS[n](seed=seed)
        else:
            RUNS[n]()
