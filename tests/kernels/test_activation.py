"""silu_and_mul against the model's torch activation (F.silu(gate) * up over the merged gate_up output)."""


import pytest
import torch
import torch.nn.functional as F


from kernels import silu_and_mul  # noqa: E402

from tests.triton_env import DEVICE, INTERPRET  # noqa: E402
# The interpreter casts float32 -> bf16 by truncation (the GPU rounds to nearest): looser there.
TOLERANCES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 2e-2 if INTERPRET else 8e-3)]


def reference(gate_up):  # as SiluAndMulMLP.forward computes it
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rel_err(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("dtype,tol", TOLERANCES)
@pytest.mark.parametrize("d", [64, 1536, 1500])  # one tile; whole tiles; a ragged last tile
def test_silu_and_mul_matches_torch(dtype, tol, d):
    x = (3 * torch.randn(5, 2 * d, device=DEVICE)).to(dtype)
    out = silu_and_mul(x)
    assert out.shape == (5, d) and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, reference(x)) < tol


def test_silu_and_mul_strided_rows_and_out():
    """Rows that are views into a wider buffer, written into a caller's strided `out`."""
    d = 576
    x = torch.randn(4, 3 * d, device=DEVICE)[:, :2 * d]
    buffer = torch.full((4, 2 * d), float("nan"), device=DEVICE)
    out = buffer[:, d:]
    assert silu_and_mul(x, out=out) is out
    assert rel_err(out, reference(x)) < 1e-5
    assert torch.isnan(buffer[:, :d]).all()  # nothing written outside out


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(100) = inf: silu -> -0
def test_silu_and_mul_extreme_gates():
    x = torch.tensor([[-100.0, 0.0, 30.0, 2.0, 3.0, -4.0]], device=DEVICE)
    assert rel_err(silu_and_mul(x), reference(x)) < 1e-6


def test_silu_and_mul_rejects_bad_inputs():
    x = torch.randn(3, 128, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(x[:, :127])
    with pytest.raises(ValueError, match="2 dims"):
        silu_and_mul(x.view(3, 2, 64))
    with pytest.raises(ValueError, match="last dim"):
        silu_and_mul(torch.randn(128, 3, device=DEVICE).t())
    with pytest.raises(ValueError, match="out must be"):
        silu_and_mul(x, out=torch.empty(3, 128, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        silu_and_mul(x, out=torch.empty(3, 64, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="dtype"):
        silu_and_mul(x.to(torch.float64))
