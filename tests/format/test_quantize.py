"""The one int8 quantizer (``format/store.py:quantize_int8``): per-row symmetric codes, zero rows exactly zero."""

from __future__ import annotations

import numpy as np
import pytest

from proponent.format.store import quantize_int8


def test_codes_times_scale_is_within_half_a_step() -> None:
    x = np.random.default_rng(0).standard_normal((7, 257)).astype(np.float32)
    codes, scale = quantize_int8(x)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (7,)
    assert np.all(np.abs(codes).max(axis=1) == 127)  # each row's peak maps to +-127
    np.testing.assert_allclose(scale, np.abs(x).max(axis=1) / 127, rtol=1e-7)
    err = np.abs(codes.astype(np.float32) * scale[:, None] - x)
    assert np.all(err <= scale[:, None] / 2 * (1 + 1e-6))


def test_a_zero_row_has_scale_zero_and_codes_zero() -> None:
    x = np.zeros((3, 16), np.float32)
    x[1] = np.linspace(-1, 1, 16)
    codes, scale = quantize_int8(x)
    assert scale[0] == 0 and scale[2] == 0 and scale[1] > 0
    assert not codes[[0, 2]].any()
    assert np.all(np.isfinite(codes.astype(np.float32) * scale[:, None]))


@pytest.mark.parametrize("shape", [(0, 8), (4, 0)])
def test_empty_input(shape: tuple[int, int]) -> None:
    codes, scale = quantize_int8(np.zeros(shape, np.float32))
    assert codes.shape == shape and codes.dtype == np.int8 and scale.shape == (shape[0],)
