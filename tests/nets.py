"""Small real networks and data for the torch tests: scikit-learn's digits (ships with the package)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def digits(n: int | None = None):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return (x[:n], y[:n]) if n else (x, y)


def mlp(depth: int, act=nn.ReLU, width: int = 64, d_in: int = 64, init=None) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, 10))
    model = nn.Sequential(*layers)
    if init is not None:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                init(m)
    return model


def he(layer: nn.Linear) -> None:
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)


class ResidualMLP(nn.Module):
    def __init__(self, depth=8, width=64):
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                                  nn.Linear(width, width)) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


class ConvNet(nn.Module):
    """A small BN conv net on the 8x8 digit images."""

    def __init__(self, depth=4, ch=16):
        super().__init__()
        layers, c = [], 1
        for _ in range(depth):
            layers += [nn.Conv2d(c, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
            c = ch
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(ch * 64, 10)

    def forward(self, x):
        return self.head(self.body(x.view(-1, 1, 8, 8)).flatten(1))


class RowLSTM(nn.Module):
    """Reads the digit image row by row (8 steps of 8 pixels)."""

    def __init__(self, cell=nn.LSTM, hidden=32):
        super().__init__()
        self.rnn = cell(8, hidden, batch_first=True, num_layers=2)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        out, _ = self.rnn(x.view(-1, 8, 8))
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    """Rows as tokens, a 2-layer pre-norm Transformer encoder."""

    def __init__(self, d=32):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.encoder(self.embed(x.view(-1, 8, 8)) + self.pos)
        return self.head(h.mean(1))


def train(model, guard, steps=200, lr=1e-3, opt="adam", batch=64, seed=0, data=None, poison_at=None):
    """A plain loop with ``guard.step``; returns the list of losses."""
    torch.manual_seed(seed)
    x, y = data if data is not None else digits()
    optimizer = (torch.optim.Adam(model.parameters(), lr=lr) if opt == "adam"
                 else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0))
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        xb = x[idx].clone()
        if poison_at is not None and step == poison_at:
            xb[0, 0] = float("nan")
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        loss.backward()
        guard.step(optimizer)
        losses.append(loss.item())
    return losses


class CountSyncs(TorchDispatchMode):
    """Counts device-to-host reads: ``_local_scalar_dense`` (item/bool/float)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
