"""encoders.py: the two frozen stand-ins, an exactly invertible latent tokenizer and a fixed text encoder."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from encoders import SpaceToDepth, TextEncoder

# ----------------------------------------------------------------------------- the tokenizer stand-in


def test_space_to_depth_inverts_every_byte_exactly():
    frames = torch.arange(256, dtype=torch.uint8).view(1, 4, 8, 8, 1).expand(1, 4, 8, 8, 3).contiguous()
    tok = SpaceToDepth(2)
    z = tok.encode(frames)
    assert z.shape == (1, 12, 4, 4, 4) and z.min() == -1 and z.max() == 1
    assert torch.equal(tok.decode(z), frames)


@given(st.integers(1, 3), st.sampled_from([1, 2, 4]), st.integers(1, 3), st.integers(0, 2**31))
def test_space_to_depth_layout(t, f, c, seed):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (2, t, 4 * f, 2 * f, c), generator=g, dtype=torch.uint8)
    tok = SpaceToDepth(f)
    z = tok.encode(frames)
    assert z.shape == (2, c * f * f, t, 4, 2) and tok.channels(c) == c * f * f
    b, ch, tt, y, x = (int(torch.randint(0, n, (), generator=g)) for n in z.shape)
    cc, i, j = ch // (f * f), ch // f % f, ch % f
    assert z[b, ch, tt, y, x] == frames[b, tt, f * y + i, f * x + j, cc].float() / 127.5 - 1
    assert torch.equal(tok.decode(z, c), frames)


def test_space_to_depth_refuses_bad_input():
    with pytest.raises(ValueError, match="not divisible by the space-to-depth factor 4"):
        SpaceToDepth(4).encode(torch.zeros(1, 1, 6, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, T, H, W, C\) uint8"):
        SpaceToDepth(2).encode(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="expected 3 x 2"):
        SpaceToDepth(2).decode(torch.zeros(1, 8, 1, 4, 4))

# ----------------------------------------------------------------------------- the text-encoder stand-in

PINNED_RED = (-0.40297340349152544, -1.5617714009118668, 0.5530653828744428)   # w("red")[:3], any dim (SHAKE-256)


def test_text_encoder_is_fixed_padded_and_order_aware():
    enc = TextEncoder(length=8, dim=16)
    a, b, c, d = enc(["stack the red block on the blue block", "Stack the RED block, on the blue block.",
                      "stack the blue block on the red block", ""])
    assert a.shape == (8, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)                            # case and punctuation do not matter
    assert torch.equal(a[:8], TextEncoder(length=8, dim=16)(["stack the red block on the blue block"])[0])
    assert not torch.equal(a, c)                        # word order does
    assert torch.equal(d, torch.zeros(8, 16))
    short = enc(["stack the red"])[0]
    assert torch.equal(short[:3], a[:3]) and torch.equal(short[3:], torch.zeros(5, 16))
    # w("red") is a fixed function of the word (SHAKE-256), the same on every machine: pin it
    w = enc.word("red")
    np.testing.assert_allclose(w[:3], PINNED_RED, rtol=1e-12)
    assert np.abs(w).max() <= 3**0.5
    with pytest.raises(ValueError, match="has 9 words; the text encoder holds 8"):
        enc(["one two three four five six seven eight nine"])
