"""Shared fixtures: a trained digits CNN, small random models, and a model-state snapshot helper."""

from __future__ import annotations

import os

import pytest
import torch

import prunescope as ps
from prunescope.digits import DigitsCNN, batches_of, digits_splits, pretrained_digits_cnn

# One thread: these models are tiny, and with other processes on a 2-core machine a second
# OpenMP thread makes every forward pass many times slower.
torch.set_num_threads(1)

DIGITS_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


# ---- environment ---------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the trained digits CNN out of the user's ~/.cache (PRUNESCOPE_TEST_CACHE reuses a folder)."""
    previous = os.environ.get("PRUNESCOPE_CACHE")
    reuse = os.environ.get("PRUNESCOPE_TEST_CACHE")
    os.environ["PRUNESCOPE_CACHE"] = reuse or str(tmp_path_factory.mktemp("prunescope-cache"))
    yield
    if previous is None:
        os.environ.pop("PRUNESCOPE_CACHE", None)
    else:
        os.environ["PRUNESCOPE_CACHE"] = previous


# ---- the trained digits CNN ----------------------------------------------------------------


@pytest.fixture(scope="session")
def splits():
    return digits_splits()


@pytest.fixture(scope="session")
def digits_model():
    """The trained DigitsCNN (trained once per session, ~7 s). Tests must not modify it."""
    return pretrained_digits_cnn()


@pytest.fixture(scope="session")
def digits_val(splits):
    return batches_of(splits.val, batch_size=120)


@pytest.fixture(scope="session")
def digits_test(splits):
    return batches_of(splits.test, batch_size=120)


@pytest.fixture(scope="session")
def digits_profile(digits_model, digits_val):
    """Loss sensitivity of the trained digits CNN on the validation split (magnitude criterion)."""
    evaluator = ps.Evaluator(digits_model, digits_val, "loss")
    return ps.scan(digits_model, evaluator, levels=DIGITS_LEVELS)


# ---- small random models -------------------------------------------------------------------


@pytest.fixture
def small_cnn():
    """An untrained, narrow DigitsCNN and two random image batches with labels (fast)."""
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(6, 1, 8, 8, generator=generator), torch.randint(0, 10, (6,), generator=generator))
               for _ in range(2)]
    return model, batches
