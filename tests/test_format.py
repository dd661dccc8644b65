import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bawa_vllm.pruning.masks import SparsityPattern, apply_mask_, keep_mask
from bawa_vllm.sparse.format import PackedFormatError, check_packed, pack_24, unpack_24

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), groups8=st.integers(1, 6), dtype=st.sampled_from(DTYPES),
       keep_prob=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_round_trip(rows, groups8, dtype, keep_prob, seed):
    """Any tensor with at most 2 non-zeros per group of 4 survives pack -> unpack bit for bit."""
    g = torch.Generator().manual_seed(seed)
    k = 8 * groups8
    w = torch.randn(rows, k, generator=g).to(dtype)
    mask = keep_mask(torch.rand(rows, k, generator=g), SparsityPattern.parse("2:4"))
    mask &= torch.rand(rows, k, generator=g) < keep_prob  # some groups with 0 or 1 non-zeros
    apply_mask_(w, mask)
    values, meta = pack_24(w)
    assert values.shape == (rows, k // 2) and values.dtype == dtype
    assert meta.shape == (rows, k // 8) and meta.dtype == torch.uint8
    back = unpack_24(values, meta)
    assert torch.equal(back.view(torch.uint8) if dtype != torch.float32 else back.view(torch.int32),
                       w.view(torch.uint8) if dtype != torch.float32 else w.view(torch.int32))


def test_hand_computed_layout():
    w = torch.tensor([[0.0, 5, 0, 7, 1, 0, 0, 2]])
    values, meta = pack_24(w)
    assert values.tolist() == [[5, 7, 1, 2]]
    # group 0 keeps positions (1, 3) -> 1 | 3<<2 = 13; group 1 (0, 3) -> 0 | 3<<2 = 12; byte = 13 | 12<<4
    assert meta.tolist() == [[13 | (12 << 4)]]


def test_bytes_ratio():
    w = torch.zeros(128, 256, dtype=torch.bfloat16)
    values, meta = pack_24(w)
    packed = values.numel() * values.element_size() + meta.numel()
    assert packed / (w.numel() * w.element_size()) == pytest.approx(9 / 16)


def test_not_24_names_tensor_and_group():
    w = torch.zeros(4, 16)
    w[2, 8:11] = 1.0  # row 2, group 2 has 3 non-zeros
    with pytest.raises(PackedFormatError, match=r"layers.0.q_proj.weight is not 2:4 sparse: row 2, group 2"):
        pack_24(w, "layers.0.q_proj.weight")


def test_malformed_packed():
    values, meta = pack_24(torch.zeros(4, 16))
    with pytest.raises(PackedFormatError, match="expected dtype uint8"):
        check_packed(values, meta.to(torch.int16), "x")
    with pytest.raises(PackedFormatError, match="weight_meta has shape"):
        check_packed(values, meta[:, :1], "x")
    bad = meta.clone()
    bad[1, 0] = 0  # positions (0, 0)
    with pytest.raises(PackedFormatError, match="row 1, group 0 has invalid positions"):
        unpack_24(values, bad, "x")
    with pytest.raises(PackedFormatError, match="does not match the layer"):
        check_packed(values, meta, "x", shape=(4, 32))
    with pytest.raises(PackedFormatError, match="divide by 8"):
        pack_24(torch.zeros(2, 12))


def test_cutlass_layout_round_trip_on_cpu():
    """The CUTLASS kernel's own layout (built at load time on GPUs) round-trips from our unpacked weight."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    apply_mask_(w, keep_mask(w.float().abs(), SparsityPattern.parse("2:4")))
    dense = unpack_24(*pack_24(w))
    packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), w)
