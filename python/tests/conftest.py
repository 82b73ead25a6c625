import os

import numpy as np
import pytest

import flowmap

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="session")
def teacher():
    """A small checkerboard teacher, trained once for the session."""
    return flowmap.train_teacher("checkerboard", steps=300, batch=256, progress=False, hidden=64, depth=2)


@pytest.fixture(scope="session")
def fmap(teacher):
    """An EMD map distilled from it."""
    return flowmap.distill(teacher, method="emd", steps=60, batch=256, progress=False)


@pytest.fixture(scope="session")
def digits():
    """200 MNIST-shaped uint8 images with labels (a seeded blob per class, so no file is needed)."""
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 10
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((200, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        cy, cx = 6 + 2 * c, 8 + (c % 3) * 6
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0) + 0.05 * rng.random((28, 28))
        images[i] = np.clip(255 * blob, 0, 255).astype(np.uint8)
    return images, labels


@pytest.fixture(scope="session")
def image_teacher(digits):
    images, labels = digits
    return flowmap.train_teacher(
        images, labels, steps=2, batch=8, progress=False, channels=8, channel_mult=[1, 2], groups=4,
        attention_resolutions=[14], time_features=8,
    )
