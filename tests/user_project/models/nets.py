"""Two small networks a user might bring: a Transformer text classifier and a CNN."""

import torch
from torch import nn


class TextClassifier(nn.Module):
    """Token ids (B, L) -> class logits: embedding, one Transformer encoder layer, mean pool, head."""

    def __init__(self, vocab=64, dim=32, heads=2, classes=4, feedforward=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class SmallCNN(nn.Module):
    """(B, 1, 8, 8) images -> class logits."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc(x.flatten(1))))


def build_text(**options):
    return TextClassifier(**options)


def build_cnn(**options):
    return SmallCNN(**options)
