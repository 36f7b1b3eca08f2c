"""Shared fixtures. Tiny random reference checkpoints are written by helpers the tests import:
``mm_testing`` (Hugging Face Llama and Mllama folders, written by transformers) and
``meta_reference`` (Meta's ``CrossAttentionTransformer`` in Meta's layout)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch seed, whatever ran before it."""
    torch.manual_seed(0)
    yield
