"""Tiny models, their exact neuron permutations, and a toy task, shared by the fusion tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(d_in: int = 10, hidden: tuple[int, ...] = (16, 16), classes: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    prev = d_in
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, classes))
    return nn.Sequential(*layers)


def cnn_bn(classes: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, classes),
    )


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 3, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.block1 = Block(width, width)
        self.block2 = Block(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(1.0 + 0.3 * torch.randn(c, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(c, generator=g))
    return model.eval()


# ----------------------------------------------------------------------------- permutations


def _perm_out(layer: nn.Module, p: Tensor) -> None:
    layer.weight.data = layer.weight.data[p]
    if getattr(layer, "bias", None) is not None:
        layer.bias.data = layer.bias.data[p]
    if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
        layer.running_mean.data = layer.running_mean.data[p]
        layer.running_var.data = layer.running_var.data[p]


def _perm_in(layer: nn.Module, p: Tensor, repeat: int = 1) -> None:
    w = layer.weight.data
    if repeat > 1:  # conv channels flattened into a linear layer's inputs
        w = w.reshape(w.shape[0], -1, repeat)[:, p].reshape(w.shape[0], -1)
    else:
        w = w[:, p]
    layer.weight.data = w


def permute_sequential(
    model: nn.Sequential, seed: int = 1, flatten_repeat: int = 1
) -> nn.Sequential:
    """A copy of a Linear/Conv/BatchNorm chain with every hidden neuron randomly permuted."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv1d)]
    for i, layer in enumerate(layers[:-1]):
        width = layer.weight.shape[0]
        p = torch.randperm(width, generator=g)
        _perm_out(layer, p)
        idx = list(model).index(layer)
        nxt = list(model)[idx + 1]
        if isinstance(nxt, nn.BatchNorm1d | nn.BatchNorm2d):
            _perm_out(nxt, p)
        following = layers[i + 1]
        repeat = (
            flatten_repeat
            if isinstance(following, nn.Linear) and not isinstance(layer, nn.Linear)
            else 1
        )
        _perm_in(following, p, repeat)
    return model


def permute_resnet(model: TinyResNet, seed: int = 1) -> TinyResNet:
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    w = model.conv1.out_channels
    s1 = torch.randperm(w, generator=g)
    _perm_out(model.conv1, s1)
    _perm_out(model.bn1, s1)
    # block1: identity skip keeps s1
    t1 = torch.randperm(w, generator=g)
    b = model.block1
    _perm_in(b.conv1, s1), _perm_out(b.conv1, t1), _perm_out(b.bn1, t1)
    _perm_in(b.conv2, t1), _perm_out(b.conv2, s1), _perm_out(b.bn2, s1)
    # block2: downsample, new residual permutation s2
    t2 = torch.randperm(2 * w, generator=g)
    s2 = torch.randperm(2 * w, generator=g)
    b = model.block2
    _perm_in(b.conv1, s1), _perm_out(b.conv1, t2), _perm_out(b.bn1, t2)
    _perm_in(b.conv2, t2), _perm_out(b.conv2, s2), _perm_out(b.bn2, s2)
    _perm_in(b.downsample[0], s1), _perm_out(b.downsample[0], s2), _perm_out(b.downsample[1], s2)
    _perm_in(model.fc, s2)
    return model


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- a toy task


def toy_task(n: int = 1200, d: int = 10, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian class blobs pushed through a fixed random nonlinearity (learnable, not linear)."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.5 * torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return torch.tanh(x @ mix) + 0.5 * x, y


def train(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int = 60, lr: float = 1e-2, seed: int = 0
) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i : i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def permuted_by_analysis(
    model: nn.Module, seed: int = 1, example: Tensor | None = None
) -> nn.Module:
    """A copy of ``model`` with every free permutation space (heads kept whole) permuted at
    random: the same function, other weights."""
    from neurofuse.alignment import apply_permutation, permutation_spaces, random_permutation

    spaces = permutation_spaces(model, example=example)
    g = torch.Generator().manual_seed(seed)
    perms = {s.name: random_permutation(s, g) for s in spaces if not s.fixed}
    twin = copy.deepcopy(model)
    twin.load_state_dict(apply_permutation(model.state_dict(), spaces, perms))
    return twin.eval()
