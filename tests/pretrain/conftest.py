"""Fixtures for the pretraining core tests (model, losses, data)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """A real photograph (512x512 RGB) shipped with scikit-image."""
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
