"""Fixtures shared by the test modules (helpers live in tests/utils.py)."""

import pytest
import torch

from tests.utils import tiny_calm_config


@pytest.fixture
def calm_config():
    return tiny_calm_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
