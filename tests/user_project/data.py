"""Generated data with planted rules, as lists of (x, y) batches.

text: 16 random tokens from [4, vocab); the class c in 0..3 is planted as token c at 4 positions.
images: 8x8 noise; class c brightens quadrant c.
"""

import torch

CLASSES = 4


def _batches(x, y, batch_size):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def text(n, seed=0, vocab=64, length=16):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randint(CLASSES, vocab, (n, length), generator=g)
    positions = torch.rand(n, length, generator=g).argsort(1)[:, :4]
    x.scatter_(1, positions, y[:, None].expand(-1, 4))
    return x, y


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.8
    for c in range(CLASSES):
        r, col = divmod(c, 2)
        x[y == c, :, r * 4 : r * 4 + 4, col * 4 : col * 4 + 4] += 1.0
    return x, y


def load(kind="text", n_train=512, n_val=256, n_test=256, batch_size=32, seed=0):
    """The dataset factory a spec names ("data:load"): a dict of train/val/test batch lists."""
    make = {"text": text, "images": images}[kind]
    splits = {}
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        splits[split] = _batches(*make(n, seed * 10 + i), batch_size)
    return splits


def broken(**options):
    raise RuntimeError("the data server is down")


def not_data(**options):
    return 42
