"""Image classifiers from the papers: MLP 784-512-10 (Bayesian), LeNet-5 (L0), CIFAR ResNets (LWIQ)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    """784-512-10 in the Bayesian paper; the input size follows the data."""

    def __init__(self, input_shape, num_classes, hidden: int = 512):
        super().__init__(
            nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )


class LeNet5(nn.Module):
    """Caffe LeNet-5 (20-50 conv, 500 fc), as in the L0 papers; 'same' convs for inputs under 28 px."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        channels, height, _ = input_shape
        pad = 0 if height >= 28 else 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, 20, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.classifier = nn.Sequential(nn.Linear(flat, 500), nn.ReLU(), nn.Linear(500, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """CIFAR ResNet block with the parameter-free 'option A' shortcut (He et al. 2016)."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 16-32-64 channels, n blocks per stage."""

    def __init__(self, depth, input_shape, num_classes):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth: CIFAR ResNets have depth 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet20(input_shape, num_classes, **kwargs):
    """CifarResNet of depth 20 (its keyword options)."""
    return CifarResNet(20, input_shape, num_classes, **kwargs)


def resnet32(input_shape, num_classes, **kwargs):
    """CifarResNet of depth 32 (its keyword options)."""
    return CifarResNet(32, input_shape, num_classes, **kwargs)


def resnet56(input_shape, num_classes, **kwargs):
    """CifarResNet of depth 56 (its keyword options)."""
    return CifarResNet(56, input_shape, num_classes, **kwargs)


for _builder in (resnet20, resnet32, resnet56):
    _builder.options_of = CifarResNet  # what the preflight checks model_options against
