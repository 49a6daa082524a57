"""The export-time patches compute exactly what diffusers computes."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from export import wrappers


@pytest.mark.parametrize("sequence_dim", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_as_a_pair_swap_matmul_equals_diffusers_bit_for_bit(sequence_dim, dtype):
    g = torch.Generator().manual_seed(0)
    heads, seq, dim = 3, 11, 16
    shape = (2, heads, seq, dim) if sequence_dim == 2 else (2, seq, heads, dim)
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    angles = torch.randn(seq, dim // 2, generator=g) * 3
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = angles.sin().repeat_interleave(2, dim=-1)
    want = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=sequence_dim)
    got = wrappers._rotary_traceable(x, (cos, sin), sequence_dim=sequence_dim)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


def test_pair_swap_is_diffusers_rotate_half():
    x = torch.arange(1.0, 9.0)
    assert (x @ wrappers.pair_swap(8)).tolist() == [-2.0, 1.0, -4.0, 3.0, -6.0, 5.0, -8.0, 7.0]
