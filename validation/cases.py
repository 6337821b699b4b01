"""Validation cases for gradguard: real (small, CPU) training runs, healthy and pathological.

Each case builder returns a dict:
  model, opt, batch(step) -> batch, loss(model, batch) -> scalar loss,
  optional: sched (stepped every optimizer step), accum (micro-batches per optimizer step),
            on_step(step, opt) hook (e.g. an LR spike), time_probe (module whose input gets a
            through-time gradient probe), first/last (param names for the weight-movement measure).
A case declares `expected` kinds (must be found: else false negative) and `acceptable` kinds
(may be found, physically consistent with the pathology: not a false positive).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[], dict]
    expected: frozenset = frozenset()
    acceptable: frozenset = frozenset()
    steps: int = 300
    group: str = "healthy"
    note: str = ""


CASES: list[Case] = []


def case(name, expected=(), acceptable=(), steps=300, note=""):
    def deco(fn):
        grp = "pathological" if expected else ("ambiguous" if acceptable else "healthy")
        CASES.append(Case(name, fn, frozenset(expected), frozenset(acceptable), steps, grp, note))
        return fn
    return deco


# ----------------------------------------------------------------------------------------- data

_DIGITS = None


def digits():
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-3)  # standardised; constant corner pixels stay 0
        _DIGITS = (x, torch.tensor(y))
    return _DIGITS


def digits_batches(bs=64, image=False, gen_seed=0, raw=False):
    x, y = digits()
    if raw:  # pixel/16 in [0, 1], as the repo's own tests use
        from sklearn.datasets import load_digits
        x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    g = torch.Generator().manual_seed(gen_seed)

    def batch(step):
        idx = torch.randint(0, len(x), (bs,), generator=g)
        xb = x[idx]
        return (xb.view(-1, 1, 8, 8) if image else xb), y[idx]
    return batch


def ce(model, b):
    return F.cross_entropy(model(b[0]), b[1])


def mse(model, b):
    return F.mse_loss(model(b[0]), b[1])


def regression_batches(bs=64, d=32, seed=0, x_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d, 64, generator=g) / math.sqrt(d)
    w2 = torch.randn(64, 1, generator=g) / 8.0

    def batch(step):
        x = torch.randn(bs, d, generator=g)
        y = torch.tanh(x @ w1) @ w2 * 3.0 + 0.05 * torch.randn(bs, 1, generator=g)
        return x * x_scale, y
    return batch


def memory_batches(T, vocab=16, bs=32, classes=4, seed=0):
    """Label = first token mod `classes`: the net must carry it across T steps."""
    g = torch.Generator().manual_seed(seed)

    def batch(step):
        t = torch.randint(0, vocab, (bs, T), generator=g)
        return t, t[:, 0] % classes
    return batch


def reverse_batches(T=12, vocab=20, bs=32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def batch(step):
        t = torch.randint(0, vocab, (bs, T), generator=g)
        return t, t.flip(1)
    return batch


class Markov:
    """A sparse random Markov chain over a large vocabulary: each token has 4 successors."""

    def __init__(self, vocab, seed=0, k=4):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.g = vocab, g
        self.next = torch.randint(0, vocab, (vocab, k), generator=g)
        self.k = k

    def sample(self, bs, T):
        out = torch.empty(bs, T, dtype=torch.long)
        # Zipf-ish start distribution so frequent and rare tokens both occur
        ranks = torch.arange(1, self.vocab + 1, dtype=torch.float)
        p = 1.0 / ranks
        cur = torch.multinomial(p / p.sum(), bs, replacement=True, generator=self.g)
        for t in range(T):
            out[:, t] = cur
            cur = self.next[cur, torch.randint(0, self.k, (bs,), generator=self.g)]
        return out


def lm_batches(vocab, bs=16, T=32, seed=0):
    chain = Markov(vocab, seed)

    def batch(step):
        s = chain.sample(bs, T + 1)
        return s[:, :-1], s[:, 1:]
    return batch


def lm_loss(model, b):
    logits = model(b[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[1].reshape(-1))


def seq_ce(model, b):  # per-position classification (reverse task)
    logits = model(b[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[1].reshape(-1))


def warmup_cosine(opt, warmup, total):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# ----------------------------------------------------------------------------------------- models

def mlp(sizes, act, init=None, bias=None, dropout=0.0, norm=None, out_act=None):
    layers = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        if init is not None:
            init(lin.weight)
        if bias is not None and i < len(sizes) - 2:
            nn.init.constant_(lin.bias, bias)
        layers.append(lin)
        if i < len(sizes) - 2:
            if norm is not None:
                layers.append(norm(sizes[i + 1]))
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    if out_act is not None:
        layers.append(out_act())
    return nn.Sequential(*layers)


def he(w):
    nn.init.kaiming_normal_(w, nonlinearity="relu")


class ResMLP(nn.Module):
    def __init__(self, depth=8, width=64, d_in=64, out=10, zero_out=False, layerscale=None):
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList()
        self.scales = nn.ParameterList() if layerscale is not None else None
        for _ in range(depth):
            blk = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            if zero_out:
                nn.init.zeros_(blk[-1].weight)
                nn.init.zeros_(blk[-1].bias)
            self.blocks.append(blk)
            if layerscale is not None:
                self.scales.append(nn.Parameter(torch.full((width,), layerscale)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out)

    def forward(self, x):
        h = self.stem(x)
        for i, b in enumerate(self.blocks):
            h = h + (b(h) * self.scales[i] if self.scales is not None else b(h))
        return self.head(self.norm(h))


class ConvNet(nn.Module):
    def __init__(self, depth=4, ch=16):
        super().__init__()
        layers, c = [], 1
        for _ in range(depth):
            layers += [nn.Conv2d(c, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU()]
            c = ch
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(ch, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, ch, zero_gamma):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)
        self.c2, self.b2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)
        if zero_gamma:
            nn.init.zeros_(self.b2.weight)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    def __init__(self, blocks=4, ch=16, zero_gamma=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU())
        self.blocks = nn.Sequential(*[BasicBlock(ch, zero_gamma) for _ in range(blocks)])
        self.head = nn.Linear(ch, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class RNNClassifier(nn.Module):
    def __init__(self, cell, vocab=16, emb=16, hidden=64, classes=4, freeze_emb=False, **kw):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.emb.weight.requires_grad_(not freeze_emb)
        self.rnn = cell(emb, hidden, batch_first=True, **kw)
        self.head = nn.Linear(hidden, classes)

    def forward(self, t):
        out, _ = self.rnn(self.emb(t))
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    """nn.TransformerEncoder sequence model: per-position logits (reverse task or causal LM)."""

    def __init__(self, vocab, d=64, layers=2, heads=4, T=64, norm_first=True, causal=False, tie=False,
                 dropout=0.0, freeze_emb=False, act="relu"):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.02)
        enc = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=dropout, batch_first=True, norm_first=norm_first,
                                         activation=act)
        self.enc = nn.TransformerEncoder(enc, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=not tie)
        if tie:
            nn.init.normal_(self.emb.weight, std=0.02)  # as tied LMs do (GPT-2: 0.02)
            self.head.weight = self.emb.weight
        if freeze_emb:
            self.emb.weight.requires_grad_(False)
        self.causal = causal

    def forward(self, t):
        T = t.shape[1]
        h = self.emb(t) + self.pos[:T]
        mask = nn.Transformer.generate_square_subsequent_mask(T) if self.causal else None
        h = self.enc(h, mask=mask, is_causal=self.causal)
        return self.head(self.norm(h))


class LSTMLM(nn.Module):
    def __init__(self, vocab, emb=64, hidden=128):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, t):
        return self.head(self.rnn(self.emb(t))[0])


class MHAModel(nn.Module):
    def __init__(self, vocab=20, d=64, heads=4, T=12, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.02)
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, heads, batch_first=True) for _ in range(layers))
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(2 * layers))
        self.ff = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, t):
        h = self.emb(t) + self.pos[: t.shape[1]]
        for i, (a, f) in enumerate(zip(self.attn, self.ff)):
            x = self.ln[2 * i](h)
            h = h + a(x, x, x, need_weights=False)[0]
            h = h + f(self.ln[2 * i + 1](h))
        return self.head(h)


class LayerScaleTransformer(nn.Module):
    """Pre-norm blocks whose attention and MLP branches are multiplied by a learnable gamma (1e-6),
    CaiT-style. With ``freeze_emb`` the first trainable layer is inside the first block."""

    def __init__(self, vocab=20, d=64, heads=4, T=12, layers=4, init=1e-6, freeze_emb=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.emb.weight.requires_grad_(not freeze_emb)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.02, requires_grad=not freeze_emb)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.ln1, blk.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
            blk.ln2, blk.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            blk.g1 = nn.Parameter(torch.full((d,), init))
            blk.g2 = nn.Parameter(torch.full((d,), init))
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, t):
        h = self.emb(t) + self.pos[: t.shape[1]]
        for b in self.blocks:
            x = b.ln1(h)
            h = h + b.g1 * b.attn(x, x, x, need_weights=False)[0]
            h = h + b.g2 * b.mlp(b.ln2(h))
        return self.head(self.norm(h))


class LinearDeep(nn.Module):
    def __init__(self, depth=10, width=32, d_in=32, gain=2.0):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width if i else d_in, width if i < depth - 1 else 1, bias=False)
                                    for i in range(depth))
        for l in self.layers:
            nn.init.orthogonal_(l.weight, gain=gain)

    def forward(self, x):
        for l in self.layers:
            x = l(x)
        return x


# ----------------------------------------------------------------------------------------- healthy

@case("mlp_relu_he_adam")
def _():
    m = mlp([64, 128, 128, 128, 128, 10], nn.ReLU, init=he)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=digits_batches(), loss=ce)


@case("mlp_relu_he_sgdm")
def _():
    m = mlp([64, 128, 128, 128, 128, 10], nn.ReLU, init=he)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.02, momentum=0.9), batch=digits_batches(), loss=ce)


@case("mlp_relu_bn_deep20_sgdm")
def _():
    m = mlp([64] + [64] * 20 + [10], nn.ReLU, init=he, norm=nn.BatchNorm1d)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), batch=digits_batches(), loss=ce)


@case("resmlp_layernorm_adam")
def _():
    m = ResMLP(depth=8)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=digits_batches(), loss=ce)


@case("resmlp_zero_init_out_proj_sgd")
def _():
    m = ResMLP(depth=8, zero_out=True)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), batch=digits_batches(), loss=ce)


@case("resmlp_zero_init_out_proj_adam")
def _():
    m = ResMLP(depth=8, zero_out=True)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=digits_batches(), loss=ce)


@case("mlp_zero_init_last_layer_sgd")
def _():
    m = mlp([64, 128, 128, 10], nn.ReLU, init=he)
    nn.init.zeros_(m[-1].weight)
    nn.init.zeros_(m[-1].bias)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), batch=digits_batches(), loss=ce)


@case("resmlp_layerscale_1e-6_adamw")
def _():
    m = ResMLP(depth=8, layerscale=1e-6)
    return dict(model=m, opt=torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=0.05), batch=digits_batches(), loss=ce)


@case("resmlp_layerscale_1e-6_sgdm")
def _():
    m = ResMLP(depth=8, layerscale=1e-6)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), batch=digits_batches(), loss=ce)


@case("layerscale_transformer_frozen_emb_adamw", steps=200)
def _():
    m = LayerScaleTransformer(freeze_emb=True, layers=3)
    return dict(model=m, opt=torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-3),
                batch=reverse_batches(), loss=seq_ce)


@case("bn_convnet_adam")
def _():
    m = ConvNet(depth=4)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=digits_batches(image=True), loss=ce)


@case("bn_convnet_adam_l2wd")
def _():
    m = ConvNet(depth=4)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 3e-3, weight_decay=1e-2), batch=digits_batches(image=True),
                loss=ce)


@case("bn_convnet_sgd_wd", steps=200)
def _():
    m = ConvNet(depth=6)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.1, momentum=0.9, weight_decay=5e-4),
                batch=digits_batches(image=True), loss=ce)


@case("resnet_zero_gamma_sgd", steps=200)
def _():
    m = ResNet(blocks=4, zero_gamma=True)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.1, momentum=0.9, weight_decay=5e-4),
                batch=digits_batches(image=True), loss=ce)


class RowRNN(nn.Module):
    """Reads the 8x8 digit image row by row (8 steps of 8 pixels)."""

    def __init__(self, cell, hidden=64, layers=2):
        super().__init__()
        self.rnn = cell(8, hidden, batch_first=True, num_layers=layers)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.rnn(x.view(-1, 8, 8))[0][:, -1])


def count_batches(T=20, vocab=16, bs=32, seed=0):
    """Label = how many times token 3 occurs (capped at 3): needs memory over the whole sequence."""
    g = torch.Generator().manual_seed(seed)

    def batch(step):
        t = torch.randint(0, vocab, (bs, T), generator=g)
        return t, (t == 3).sum(1).clamp(max=3)
    return batch


@case("lstm_rows_digits")
def _():
    m = RowRNN(nn.LSTM)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 3e-3), batch=digits_batches(), loss=ce)


@case("gru_rows_digits")
def _():
    m = RowRNN(nn.GRU)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 3e-3), batch=digits_batches(), loss=ce)


@case("lstm_frozen_embedding_count")
def _():
    m = RNNClassifier(nn.LSTM, freeze_emb=True, num_layers=2)
    return dict(model=m, opt=torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 3e-3),
                batch=count_batches(), loss=ce)


@case("transformer_prenorm_reverse", steps=200)
def _():
    m = TinyTransformer(20, norm_first=True, layers=3)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=reverse_batches(), loss=seq_ce)


@case("transformer_postnorm_reverse", steps=200)
def _():
    m = TinyTransformer(20, norm_first=False, layers=3)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 5e-4), batch=reverse_batches(), loss=seq_ce)


@case("mha_model_reverse", steps=200)
def _():
    m = MHAModel()
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=reverse_batches(), loss=seq_ce)


@case("charlm_lstm_vocab4000", steps=200)
def _():
    m = LSTMLM(4000, emb=48, hidden=96)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 3e-3), batch=lm_batches(4000, bs=12, T=24), loss=lm_loss,
                time_probe=m.rnn)


@case("charlm_transformer_vocab4000_tied_warmcos", steps=200)
def _():
    m = TinyTransformer(4000, d=64, layers=2, causal=True, tie=True, T=32)
    opt = torch.optim.AdamW(m.parameters(), 3e-3, weight_decay=0.01)
    return dict(model=m, opt=opt, sched=warmup_cosine(opt, 30, 200), batch=lm_batches(4000, bs=12, T=24), loss=lm_loss)


@case("charlm_transformer_vocab8000_frozen_emb", steps=200)
def _():
    m = TinyTransformer(8000, d=64, layers=2, causal=True, T=32, freeze_emb=True)
    return dict(model=m, opt=torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-3),
                batch=lm_batches(8000, bs=8, T=24), loss=lm_loss)


@case("mlp_dropout_adam")
def _():
    m = mlp([64, 256, 256, 10], nn.ReLU, init=he, dropout=0.5)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=digits_batches(), loss=ce)


@case("transformer_dropout_warmup_cosine", steps=200)
def _():
    m = TinyTransformer(20, layers=3, dropout=0.1)
    opt = torch.optim.AdamW(m.parameters(), 2e-3)
    return dict(model=m, opt=opt, sched=warmup_cosine(opt, 40, 200), batch=reverse_batches(), loss=seq_ce)


@case("mlp_tiny_batch4_adam")
def _():
    m = mlp([64, 128, 128, 10], nn.ReLU, init=he)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=digits_batches(bs=4), loss=ce)


@case("mlp_tiny_batch4_sgd")
def _():
    m = mlp([64, 128, 128, 10], nn.ReLU, init=he)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.01, momentum=0.9), batch=digits_batches(bs=4), loss=ce)


@case("convnet_tiny_batch4_adam")
def _():
    m = ConvNet(depth=3)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=digits_batches(bs=4, image=True), loss=ce)


@case("mlp_grad_accum4_sgdm")
def _():
    m = mlp([64, 128, 128, 10], nn.ReLU, init=he)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.02, momentum=0.9), batch=digits_batches(bs=16),
                loss=lambda mm, b: ce(mm, b) / 4, accum=4)


@case("regression_mlp_mse_adam")
def _():
    m = mlp([32, 64, 64, 1], nn.ReLU, init=he)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=regression_batches(), loss=mse)


@case("tanh_mlp_glorot_sgd")
def _():
    m = mlp([64, 64, 64, 10], nn.Tanh, init=nn.init.xavier_normal_)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), batch=digits_batches(), loss=ce)


@case("binary_sigmoid_output_bceloss", note="nn.Sigmoid as the output layer with BCELoss: saturates when confident")
def _():
    x, y = digits()
    g = torch.Generator().manual_seed(0)
    m = mlp([64, 64, 64, 1], nn.ReLU, init=he, out_act=nn.Sigmoid)

    def batch(step):
        idx = torch.randint(0, len(x), (64,), generator=g)
        return x[idx], (y[idx] < 5).float()[:, None]
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 3e-3), batch=batch,
                loss=lambda mm, b: F.binary_cross_entropy(mm(b[0]), b[1]))


@case("gated_mlp_sigmoid_gates", note="GLU-style hidden sigmoid gates")
def _():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(64, 128)
            self.val, self.gate = nn.Linear(128, 128), nn.Linear(128, 128)
            self.sig = nn.Sigmoid()
            self.out = nn.Linear(128, 10)

        def forward(self, x):
            h = F.relu(self.inp(x))
            return self.out(self.val(h) * self.sig(self.gate(h)))
    m = Gated()
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=digits_batches(), loss=ce)


# ---------------- HF transformers (random init from Config classes; no downloads)

def _hf():
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def copy_lm_batches(vocab=32, T=12, bs=16, seed=0):
    """[a1..aT, SEP, a1..aT]: the second half is predictable by copying."""
    g = torch.Generator().manual_seed(seed)
    sep = vocab - 1

    def batch(step):
        a = torch.randint(0, vocab - 1, (bs, T), generator=g)
        s = torch.cat([a, torch.full((bs, 1), sep), a], 1)
        labels = s.clone()
        labels[:, : T + 1] = -100
        return s, labels
    return batch


@case("hf_gpt2_copy", steps=200)
def _():
    tf = _hf()
    cfg = tf.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=32, n_positions=32, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = tf.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    return dict(model=m, opt=opt, sched=warmup_cosine(opt, 20, 200), batch=copy_lm_batches(),
                loss=lambda mm, b: mm(input_ids=b[0], labels=b[1]).loss)


@case("hf_gpt2_copy_dropout_4layer", steps=200)
def _():
    tf = _hf()
    cfg = tf.GPT2Config(n_layer=4, n_head=2, n_embd=64, vocab_size=32, n_positions=32, bos_token_id=0, eos_token_id=0)
    m = tf.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=0.1)
    return dict(model=m, opt=opt, batch=copy_lm_batches(), loss=lambda mm, b: mm(input_ids=b[0], labels=b[1]).loss)


def mirror_mlm_batches(vocab=32, T=8, bs=16, seed=0, mask_id=1):
    """Sequences a + reversed(a); 15% of tokens masked; masked tokens are predictable from the mirror."""
    g = torch.Generator().manual_seed(seed)

    def batch(step):
        a = torch.randint(5, vocab, (bs, T), generator=g)
        s = torch.cat([a, a.flip(1)], 1)
        mask = torch.rand(s.shape, generator=g) < 0.15
        mask[:, 0] |= ~mask.any(1)
        labels = torch.where(mask, s, torch.full_like(s, -100))
        return s.masked_fill(mask, mask_id), labels
    return batch


@case("hf_bert_mlm_mirror", steps=200)
def _():
    tf = _hf()
    cfg = tf.BertConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32, pad_token_id=0)
    m = tf.BertForMaskedLM(cfg)
    return dict(model=m, opt=torch.optim.AdamW(m.parameters(), 1e-3), batch=mirror_mlm_batches(),
                loss=lambda mm, b: mm(input_ids=b[0], labels=b[1]).loss)


@case("hf_bert_seqcls_pooler_tanh", steps=200, note="BertForSequenceClassification: pooler is nn.Tanh")
def _():
    tf = _hf()
    cfg = tf.BertConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32, pad_token_id=0, num_labels=2)
    m = tf.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)

    def batch(step):
        s = torch.randint(5, 32, (16, 12), generator=g)
        return s, (s == 7).any(1).long()
    return dict(model=m, opt=torch.optim.AdamW(m.parameters(), 1e-3), batch=batch,
                loss=lambda mm, b: mm(input_ids=b[0], labels=b[1]).loss)


@case("hf_t5_reverse", steps=200)
def _():
    tf = _hf()
    cfg = tf.T5Config(vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    m = tf.T5ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(0)

    def batch(step):
        s = torch.randint(2, 32, (16, 10), generator=g)
        return s, s.flip(1)
    return dict(model=m, opt=torch.optim.AdamW(m.parameters(), 1e-3), batch=batch,
                loss=lambda mm, b: mm(input_ids=b[0], labels=b[1]).loss)


@case("hf_vit_digits", steps=200)
def _():
    tf = _hf()
    cfg = tf.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=128, num_labels=10)
    m = tf.ViTForImageClassification(cfg)
    return dict(model=m, opt=torch.optim.AdamW(m.parameters(), 1e-3), batch=digits_batches(image=True),
                loss=lambda mm, b: mm(pixel_values=b[0], labels=b[1]).loss)


# ----------------------------------------------------------------------------------------- pathological

for _depth in (5, 8, 12, 20):
    def _mk(depth):
        @case(f"deep_sigmoid_mlp_d{depth}_sgd", expected={"vanishing"}, acceptable={"saturated"})
        def _():
            m = mlp([64] + [64] * depth + [10], nn.Sigmoid)
            return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.1, momentum=0.9), batch=digits_batches(), loss=ce)
    _mk(_depth)


@case("deep_sigmoid_mlp_d12_adam", expected={"vanishing"}, acceptable={"saturated"})
def _():
    m = mlp([64] + [64] * 12 + [10], nn.Sigmoid)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=digits_batches(), loss=ce)


@case("tiny_init_tanh_mlp_sgd", expected={"vanishing"})
def _():
    m = mlp([64] + [64] * 6 + [10], nn.Tanh, init=lambda w: nn.init.normal_(w, std=0.01))
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), batch=digits_batches(), loss=ce)


@case("tiny_init_tanh_mlp_adam", expected={"vanishing"})
def _():
    m = mlp([64] + [64] * 6 + [10], nn.Tanh, init=lambda w: nn.init.normal_(w, std=0.01))
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-4), batch=digits_batches(), loss=ce)


@case("vanilla_tanh_rnn_T100", expected={"vanishing"},
      note="vanishing through time: one recurrent layer, the per-layer depth profile cannot show it")
def _():
    m = RNNClassifier(nn.RNN, nonlinearity="tanh")
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), batch=memory_batches(100), loss=ce,
                time_probe=m.rnn)


@case("lstm_T100_lastT_only", acceptable={"vanishing"},
      note="LSTM reading 100 steps, loss on the last step only: its through-time gradient vanishes too (forget gate ~0.5 at init)")
def _():
    m = RNNClassifier(nn.LSTM)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 3e-3), batch=memory_batches(100), loss=ce,
                time_probe=m.rnn)


@case("explode_biginit_sgd_mse", expected={"exploding"}, acceptable={"nonfinite"})
def _():
    m = mlp([32, 64, 64, 64, 1], nn.ReLU, init=lambda w: nn.init.normal_(w, std=0.5))
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.01), batch=regression_batches(), loss=mse)


@case("explode_bigint_sgd_ce", expected={"dead"}, acceptable={"exploding", "nonfinite"},
      note="std 0.4 init, CE: loss 135 at step 0, 20-240 for 14 steps, then chance with 85-100% of units dead. "
           "Measured: the gradient never grows past 1.5x its first value, the largest update is 18% of the "
           "weights and falls every step; an unstable start that kills the units, not growth feeding on itself")
def _():
    m = mlp([64, 128, 128, 128, 10], nn.ReLU, init=lambda w: nn.init.normal_(w, std=0.4))
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), batch=digits_batches(), loss=ce)


@case("explode_adam_lr1", expected={"exploding"}, acceptable={"nonfinite", "dead", "vanishing"},
      note="Adam at lr 1 kills 98% of the second layer's units; the first layer's gradient then sits 5-10 orders "
           "under the head: vanishing behind dead units, reported with the dead layer as its cause (issue 12)")
def _():
    m = mlp([64, 128, 128, 10], nn.ReLU, init=he)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1.0), batch=digits_batches(), loss=ce)


@case("explode_adam_lr0.1_transformer", steps=200, expected={"exploding"}, acceptable={"nonfinite", "dead"})
def _():
    m = TinyTransformer(20, layers=2, norm_first=False)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 0.1), batch=reverse_batches(), loss=seq_ce)


@case("explode_from_first_step_linreg", expected={"exploding"}, acceptable={"nonfinite"},
      note="inputs x30 with SGD lr 0.1: the very first update overshoots, the run diverges at once")
def _():
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.1), batch=regression_batches(x_scale=30.0), loss=mse)


@case("explode_deep_linear_gain2", expected={"exploding"}, acceptable={"nonfinite"})
def _():
    m = LinearDeep(depth=10, gain=2.0)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 1e-3), batch=regression_batches(), loss=mse)


@case("explode_deep_linear_gain1.3_slow", expected={"exploding"}, acceptable={"nonfinite"},
      note="gain 1.3 over 10 layers and a moderate LR: divergence builds up over tens of steps")
def _():
    m = LinearDeep(depth=10, gain=1.3)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 1e-3, momentum=0.9), batch=regression_batches(), loss=mse)


@case("explode_relu_rnn_gain1.8", expected={"exploding"}, acceptable={"nonfinite"},
      note="ReLU RNN, W_hh orthogonal x1.8 over 40 steps: gradient 4e3 at step 0, the first update overflows")
def _():
    m = RNNClassifier(nn.RNN, nonlinearity="relu")
    nn.init.orthogonal_(m.rnn.weight_hh_l0, gain=1.8)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.02), batch=memory_batches(40), loss=ce)


def poisoned(batch_fn, steps_bad):
    def batch(step):
        x, y = batch_fn(step)
        if step in steps_bad:
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y
    return batch


@case("nan_poisoned_batch_once", expected={"nonfinite"})
def _():
    m = mlp([64, 128, 128, 10], nn.ReLU, init=he)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=poisoned(digits_batches(), {123}), loss=ce)


@case("nan_poisoned_batches_bn_conv", expected={"nonfinite"})
def _():
    m = ConvNet(depth=3)
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3),
                batch=poisoned(digits_batches(image=True), set(range(40, 300, 37))), loss=ce)


@case("nan_log0_manual_bce", expected={"nonfinite"}, acceptable={"saturated", "exploding"},
      note="hand-written BCE log(sigmoid): float32 sigmoid reaches exactly 1.0 -> log(1-p) = log(0)")
def _():
    x, y = digits()
    g = torch.Generator().manual_seed(0)
    m = mlp([64, 64, 1], nn.ReLU, init=he)

    def batch(step):
        idx = torch.randint(0, len(x), (64,), generator=g)
        return x[idx], (y[idx] == 0).float()[:, None]

    def loss(mm, b):
        p = torch.sigmoid(mm(b[0]))
        return -(b[1] * torch.log(p) + (1 - b[1]) * torch.log(1 - p)).mean()
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 5e-2), batch=batch, loss=loss)


@case("nan_log0_softmax_underflow", expected={"nonfinite"},
      note="-log(softmax(100*logits)[y]) by hand: probabilities underflow to exactly 0 -> log(0) -> NaN gradients")
def _():
    m = mlp([64, 64, 10], nn.ReLU, init=he)

    def loss(mm, b):
        p = torch.softmax(100.0 * mm(b[0]), dim=1)
        return -torch.log(p.gather(1, b[1][:, None])).mean()
    return dict(model=m, opt=torch.optim.Adam(m.parameters(), 1e-3), batch=digits_batches(), loss=loss)


@case("dead_relu_negative_bias", expected={"dead"}, acceptable={"vanishing"})
def _():
    m = mlp([64, 128, 128, 128, 10], nn.ReLU, init=he, bias=-6.0)
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), batch=digits_batches(), loss=ce)


@case("dead_relu_adam_lr_spike", expected={"dead"}, acceptable={"exploding"},
      note="healthy Adam run; steps 100-104 at lr 0.1 (x100) kill most units of the second hidden layer")
def _():
    m = mlp([64, 128, 128, 128, 10], nn.ReLU, init=he)
    opt = torch.optim.Adam(m.parameters(), 1e-3)

    def on_step(step, o):
        for gr in o.param_groups:
            gr["lr"] = 0.1 if 100 <= step < 105 else 1e-3
    return dict(model=m, opt=opt, batch=digits_batches(), loss=ce, on_step=on_step)


@case("relu_sgd_lr_spike_recovers", acceptable={"exploding", "dead"},
      note="SGD lr x1000 for one step at step 100: gradient x1000, a few units die, the run recovers; ambiguous")
def _():
    m = mlp([64, 128, 128, 128, 10], nn.ReLU, init=he)
    opt = torch.optim.SGD(m.parameters(), 0.02)

    def on_step(step, o):
        for gr in o.param_groups:
            gr["lr"] = 20.0 if step == 100 else 0.02
    return dict(model=m, opt=opt, batch=digits_batches(), loss=ce, on_step=on_step)


@case("saturated_sigmoid_large_init", expected={"saturated"}, acceptable={"vanishing"})
def _():
    m = mlp([64, 128, 128, 10], nn.Sigmoid, init=lambda w: nn.init.normal_(w, std=1.0))
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.05, momentum=0.9), batch=digits_batches(), loss=ce)


@case("saturated_tanh_large_init", expected={"saturated"}, acceptable={"vanishing"})
def _():
    m = mlp([64, 128, 128, 10], nn.Tanh, init=lambda w: nn.init.normal_(w, std=1.0))
    return dict(model=m, opt=torch.optim.SGD(m.parameters(), 0.01, momentum=0.9), batch=digits_batches(), loss=ce)

