"""The few-row forms of linear layers and depthwise convolutions compute what the library calls do, take
over only where they are meant to, and leave larger inputs to the library calls unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monosemantic.models import skinny


@pytest.fixture
def no_library_calls(monkeypatch):
    """Fail any library call the few-row forms are meant to replace."""

    def refuse(*args, **kwargs):
        raise AssertionError("library call on a few-row input")

    monkeypatch.setattr(nn.functional, "linear", refuse)
    monkeypatch.setattr(nn.functional, "conv1d", refuse)


def weights(n: int, k: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / k**0.5, (torch.randn(n, generator=g) if bias else None)


@pytest.mark.parametrize("shape", [(1, 256), (2, 256), (1, 2, 256), (16, 2, 256), (3, 5, 7, 64), (256, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(shape, bias):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    w, b = weights(96, shape[-1], bias)
    expected = nn.functional.linear(x, w, b)
    got = skinny.linear(x, w, b)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_linear_few_rows_skip_the_library_and_chain(no_library_calls):
    x = torch.randn(4, 2, 256)[:, :, :200]  # rows not contiguous
    w1, b1 = weights(1024, 200, True, seed=2)
    w2, b2 = weights(256, 1024, False, seed=3)
    hidden = nn.functional.silu(skinny.linear(x, w1, b1))
    out = skinny.linear(hidden, w2, b2)
    assert hidden.is_contiguous() and out.is_contiguous()
    reference = torch.nn.functional.silu(x @ w1.T + b1) @ w2.T
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-4)


def test_linear_many_rows_is_the_library_call():
    x = torch.randn(skinny.LINEAR_ROWS + 1, 64)
    w, b = weights(32, 64, True)
    got = skinny.linear(x, w, b)
    assert got.is_contiguous()
    assert torch.equal(got, nn.functional.linear(x, w, b))


@pytest.mark.parametrize("batch,frames,kernel", [(1, 2, 9), (4, 2, 9), (2, 14, 9), (8, 8, 5), (32, 2, 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_depthwise_matches_conv1d(batch, frames, kernel, bias):
    channels = 48
    conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=bias)
    x = torch.randn(batch, channels, frames + kernel - 1)
    with torch.no_grad():
        expected = conv(x)
        got = skinny.depthwise_conv1d(x, conv.weight, conv.bias)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_depthwise_few_rows_skip_the_library(no_library_calls):
    x = torch.randn(skinny.DEPTHWISE_ROWS // 2, 8, 2 + 8)  # 2 outputs a row
    w = torch.randn(8, 1, 9)
    expected = (x.unfold(2, 9, 1) * w[:, 0, None, :]).sum(-1)
    torch.testing.assert_close(skinny.depthwise_conv1d(x, w), expected, rtol=1e-5, atol=1e-5)


def test_depthwise_many_rows_is_the_library_call():
    conv = nn.Conv1d(8, 8, 9, groups=8)
    x = torch.randn(skinny.DEPTHWISE_ROWS + 1, 8, 9)  # one output a row
    with torch.no_grad():
        assert torch.equal(skinny.depthwise_conv1d(x, conv.weight, conv.bias), conv(x))
