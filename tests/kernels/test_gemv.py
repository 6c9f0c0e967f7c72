"""kernels.gemv (few-row matmul for small-batch decode) against F.linear, and where the model uses it."""

import pytest
import torch

from gpu_workers.models import elementwise  # noqa: E402
from ipc import envs  # noqa: E402
from kernels.gemv import gemv  # noqa: E402

from tests.triton_env import DEVICE  # noqa: E402


def _rel_err(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(dtype, tol, rows, bias):
    # N not a multiple of the column tile, K not a multiple of the 256-wide K tile: both edges masked.
    n, k = 83, 300
    weight = torch.randn(n, k, device=DEVICE).to(dtype)
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    got = gemv(x, weight, b)
    ref = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
    assert got.shape == (rows, n) and got.dtype == dtype
    assert _rel_err(got, ref) < tol


def test_gemv_takes_a_row_strided_input():
    x = torch.randn(3, 200, device=DEVICE)[:, :64]  # rows 200 apart, last dim contiguous
    weight = torch.randn(40, 64, device=DEVICE)
    assert _rel_err(gemv(x, weight), x @ weight.T) < 1e-6


def test_gemv_rejects_bad_inputs():
    weight = torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv(torch.randn(17, 32, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        gemv(torch.randn(2, 31, device=DEVICE), weight)
    with pytest.raises(ValueError, match="dtypes"):
        gemv(torch.randn(2, 32, device=DEVICE).half(), weight)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.randn(32, 2, device=DEVICE).T, weight)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(2, 32, device=DEVICE), weight, torch.randn(7, device=DEVICE))


def test_linear_routes_only_tuned_shapes_to_the_kernel(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_SMALL_GEMV", "1")
    assert envs.small_gemv()
    monkeypatch.setenv("PAGEDSERVE_SMALL_GEMV", "0")
    assert not envs.small_gemv()
    monkeypatch.setenv("PAGEDSERVE_SMALL_GEMV", "yes")
    with pytest.raises(ValueError, match="PAGEDSERVE_SMALL_GEMV"):
        envs.small_gemv()
    calls = []
    monkeypatch.setattr("kernels.gemv.gemv", lambda x, w, b, config: calls.append((tuple(w.shape), config)) or x @ w.T)
    monkeypatch.setattr(elementwise, "GEMV_TABLE", {(4, 8, 2): (16, 256, 4, 4)})
    x, w = torch.randn(2, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    elementwise.linear(x, w)  # a tuned (N, K, rows): the kernel, with its configuration
    elementwise.linear(x[:1], w)  # another row count: F.linear
    elementwise.linear(x, torch.randn(5, 8, device=DEVICE))  # another shape: F.linear
    assert calls == [((4, 8), (16, 256, 4, 4))]


def test_tuning_is_off_unless_switched_on(monkeypatch, tmp_path):
    monkeypatch.delenv("PAGEDSERVE_SMALL_GEMV", raising=False)
    model = torch.nn.Linear(8, 4)
    assert elementwise.tune_small_gemv(model, [1, 2]) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (28672, 4096), (1024, 2048)])
@pytest.mark.parametrize("rows", [1, 8, 16])
def test_gemv_real_shapes_gpu(n, k, rows):
    weight = (torch.randn(n, k, device=DEVICE) * 0.02).bfloat16()
    x = torch.randn(rows, k, device=DEVICE).bfloat16()
    assert _rel_err(gemv(x, weight), x.float() @ weight.float().T) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tune_keeps_only_configurations_that_compute_the_same_product():
    from kernels.gemv import CONFIGS, tune

    layers = {(1024, 2048): [((torch.randn(1024, 2048, device=DEVICE) * 0.02).bfloat16(), None) for _ in range(8)],
              (4096, 1024): [((torch.randn(4096, 1024, device=DEVICE) * 0.02).bfloat16(),
                              torch.randn(4096, device=DEVICE).bfloat16()) for _ in range(8)]}
    table = tune(layers, [1, 4])
    assert set(table) <= {(n, k, m) for n, k in layers for m in (1, 4)}
    for (n, k, m), config in table.items():
        assert config in CONFIGS
        w, b = layers[(n, k)][0]
        x = torch.randn(m, k, device=DEVICE).bfloat16()
        ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
        assert _rel_err(gemv(x, w, b, config), ref) < 1e-2
