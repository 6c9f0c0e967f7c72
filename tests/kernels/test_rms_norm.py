"""rms_norm (fused residual add + RMSNorm) against the model's torch RMSNorm, on fresh random rows."""


import pytest
import torch


from gpu_workers.models import elementwise  # noqa: E402
from gpu_workers.models.layers import RMSNorm  # noqa: E402
from kernels import rms_norm  # noqa: E402

from tests.triton_env import DEVICE, INTERPRET  # noqa: E402
# fp16 rounds exactly like torch. The interpreter casts float32 -> bf16 by truncation (the GPU rounds to
# nearest), so bf16 differs there by up to 1 bf16 ulp per rounding.
TOLERANCES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 2e-2 if INTERPRET else 8e-3)]


@pytest.fixture(autouse=True)
def torch_reference(monkeypatch):
    monkeypatch.setattr(elementwise, "MODE", "torch")  # the module under comparison is the torch path


def rel_err(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def norm_module(hidden, eps, dtype):
    module = RMSNorm(hidden, eps).to(DEVICE, dtype)
    module.weight.data = (1 + 0.3 * torch.randn(hidden, device=DEVICE)).to(dtype)
    return module


@pytest.mark.parametrize("dtype,tol", TOLERANCES)
@pytest.mark.parametrize("hidden", [576, 64, 1000])  # SmolLM2, tiny, not a power of two
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_model_rmsnorm(dtype, tol, hidden, with_residual):
    eps = 1e-5
    module = norm_module(hidden, eps, dtype)
    x = (3 * torch.randn(7, hidden, device=DEVICE)).to(dtype)
    if not with_residual:
        out = rms_norm(x, module.weight, eps)
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
        assert rel_err(out, module(x)) < tol
        return
    residual = torch.randn(7, hidden, device=DEVICE).to(dtype)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = rms_norm(x, module.weight, eps, residual)
    ref_out, ref_residual = module(x, residual)
    assert rel_err(out, ref_out) < tol
    assert torch.equal(new_residual, ref_residual) or rel_err(new_residual, ref_residual) < tol
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs untouched


def test_rms_norm_strided_rows():
    """Rows that are views into a wider buffer (last dim contiguous) are read with their stride."""
    hidden = 576
    module = norm_module(hidden, 1e-6, torch.float32)
    wide = torch.randn(5, 2 * hidden, device=DEVICE)
    x, residual = wide[:, :hidden], wide[:, hidden:]
    out, new_residual = rms_norm(x, module.weight, 1e-6, residual)
    ref_out, ref_residual = module(x, residual)
    assert rel_err(out, ref_out) < 1e-5 and torch.equal(new_residual, ref_residual)


def test_rms_norm_no_tokens():
    weight = torch.randn(64, device=DEVICE)
    out, res = rms_norm(torch.empty(0, 64, device=DEVICE), weight, 1e-6, torch.empty(0, 64, device=DEVICE))
    assert out.shape == res.shape == (0, 64)


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(3, 64, device=DEVICE)
    weight = torch.randn(64, device=DEVICE)
    with pytest.raises(ValueError, match="last dim"):
        rms_norm(torch.randn(64, 3, device=DEVICE).t(), weight, 1e-6)
    with pytest.raises(ValueError, match="2 dims"):
        rms_norm(x.view(3, 4, 16), weight, 1e-6)
    with pytest.raises(ValueError, match="weight dtype"):
        rms_norm(x, weight.half(), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, weight[:32], 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.randn(128, device=DEVICE)[::2], 1e-6)
    with pytest.raises(ValueError, match="residual must be"):
        rms_norm(x, weight, 1e-6, residual=x.half())
    with pytest.raises(ValueError, match="residual must be"):
        rms_norm(x, weight, 1e-6, residual=x[:2])
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.to(torch.float64), weight.to(torch.float64), 1e-6)
