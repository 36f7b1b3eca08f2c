"""Shared fixtures: tiny random checkpoints written by the reference implementation itself."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
