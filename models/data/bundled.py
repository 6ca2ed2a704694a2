"""`mnist14`: a small real data set shipped with the package, so the demo shows what the methods
do on real images with nothing downloaded.

4,000 training and 1,000 test images of MNIST (400 and 100 per class, drawn with a fixed seed from
the official training and test splits), 2x2-average-pooled to 14x14, stored as uint8 in
`mnist14.npz` (350 KB) and read with `np.load(allow_pickle=False)`: data only, nothing executed.
digits (1,797 8x8 images, 25 optimizer steps per epoch) is too small for the fronts to separate
methods from seed noise; this set is four times larger at 196 pixels per image.

MNIST: Yann LeCun, Corinna Cortes and Christopher J. C. Burges, http://yann.lecun.com/exdb/mnist/,
made available under the Creative Commons Attribution-Share Alike 3.0 licence (CC BY-SA 3.0);
this subset is a derived work under the same licence.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .common import DatasetError

PATH = Path(__file__).with_name("mnist14.npz")
KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_mnist14(*, seed: int = 0, max_train: int | None = None, max_test: int | None = None):
    """The bundled 14x14 MNIST subset as ClassificationData (normalized like every image set)."""
    from .images import _finish

    try:
        with np.load(PATH, allow_pickle=False) as f:
            arrays = {k: f[k] for k in KEYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"mnist14: the bundled file {PATH} is missing or damaged ({exc}); "
                           "reinstall ranksearch") from None
    x_train, x_test = arrays["x_train"][:, None], arrays["x_test"][:, None]
    return _finish("mnist14", x_train, arrays["y_train"], x_test, arrays["y_test"], 10,
                   seed=seed, max_train=max_train, max_test=max_test)
