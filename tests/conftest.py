"""Shared fixtures for the core tests."""

from __future__ import annotations

import pytest

import instructmole as im
from instructmole.tiny import tiny_flux
from tests.helpers import random_adapter


@pytest.fixture
def transformer():
    return tiny_flux(seed=0)


@pytest.fixture
def adapter(transformer) -> im.Adapter:
    return random_adapter(transformer)
