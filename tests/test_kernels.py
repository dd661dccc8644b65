import pytest
import torch
import torch.nn.functional as F

from bawa_vllm.pruning.masks import SparsityPattern, apply_mask_, keep_mask
from bawa_vllm.sparse import kernels


def _weight(n=32, k=64, dtype=torch.float32):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).to(dtype)
    return apply_mask_(w, keep_mask(w.float().abs(), SparsityPattern.parse("2:4")))


def test_cpu_prepares_dense_and_matches_linear():
    w = _weight()
    p = kernels.prepare(w)
    assert p.backend == kernels.DENSE and p.packed is None
    x = torch.randn(3, 5, 64)
    b = torch.randn(32)
    assert torch.equal(p(x, b), F.linear(x, w, b))


def test_op_schema_and_fake():
    w = _weight()
    x = torch.randn(7, 64)
    torch.library.opcheck(torch.ops.bawa_sparse.linear, (x, None, None, w, None, 32, kernels.DENSE, 0))


def test_compiles_fullgraph():
    p = kernels.prepare(_weight())

    def f(x):
        return p(x).relu()

    x = torch.randn(4, 64)
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    assert torch.allclose(compiled(x), f(x))
    assert compiled(torch.randn(9, 64)).shape == (9, 32)


@pytest.mark.parametrize("name", ["cusparselt", "cutlass"])
def test_forced_backend_falls_back_on_cpu_with_reason(monkeypatch, name):
    monkeypatch.setenv("BAWA_SPARSE_BACKEND", name)
    code, why = kernels.choose_backend(torch.device("cpu"), torch.bfloat16, 64, 64)
    assert code == kernels.DENSE and "cpu has no 2:4 sparse tensor cores" in why


def test_bad_backend_env(monkeypatch):
    monkeypatch.setenv("BAWA_SPARSE_BACKEND", "magic")
    with pytest.raises(ValueError, match="BAWA_SPARSE_BACKEND='magic'"):
        kernels.requested_backend()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backends_match_dense(monkeypatch, backend, dtype):
    monkeypatch.setenv("BAWA_SPARSE_BACKEND", backend)
    w = _weight(256, 512, dtype).cuda()
    p = kernels.prepare(w)
    if p.backend == kernels.DENSE:
        pytest.skip(f"{backend} not supported on this GPU")
    for m in (1, 7, 64, 300):
        x = torch.randn(m, 512, device="cuda", dtype=dtype)
        torch.testing.assert_close(p(x), F.linear(x, w), rtol=2e-2, atol=2e-2)
