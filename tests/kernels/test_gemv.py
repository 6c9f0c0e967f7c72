"""kernels.gemv (few-row matmul for small-batch decode: the default for models of hidden size <= 2048
under PDL, else $PAGEDSERVE_SMALL_GEMV=1) against F.linear, and where the model routes to it."""

import pytest
import torch

from gpu_workers.models import elementwise
from ipc import envs
from kernels.gemv import gemv
from tests.triton_env import DEVICE


def _rel_err(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("rows", [1, 5, 16, 40])  # 40: a 64-row tile (on CUDA the autotuned launch)
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
    with pytest.raises(ValueError, match="at most 64 rows"):
        gemv(torch.randn(65, 32, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        gemv(torch.randn(2, 31, device=DEVICE), weight)
    with pytest.raises(ValueError, match="dtypes"):
        gemv(torch.randn(2, 32, device=DEVICE).half(), weight)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.randn(32, 2, device=DEVICE).T, weight)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(2, 32, device=DEVICE), weight, torch.randn(7, device=DEVICE))


def test_the_switch_routes_only_few_row_cuda_half_precision_matmuls(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_SMALL_GEMV", "yes")
    with pytest.raises(ValueError, match="PAGEDSERVE_SMALL_GEMV"):
        envs.small_gemv()
    calls = []
    monkeypatch.setattr("kernels.gemv.gemv", lambda x, w, b: calls.append(tuple(x.shape)) or x @ w.T)
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    monkeypatch.setattr(elementwise, "_SMALL_GEMV", False)
    torch.testing.assert_close(elementwise.linear(x, w), x @ w.T)
    monkeypatch.setattr(elementwise, "_SMALL_GEMV", True)
    elementwise.linear(x, w)  # on: but a CPU float32 matmul stays F.linear
    assert calls == []
    if torch.cuda.is_available():
        xh, wh = x.cuda().half(), w.cuda().half()
        elementwise.linear(xh, wh)
        elementwise.linear(torch.randn(17, 8, device="cuda").half(), wh)  # over the row limit: cuBLAS
        monkeypatch.setattr(elementwise, "_SMALL_GEMV_ROWS", 64)
        elementwise.linear(torch.randn(17, 8, device="cuda").half(), wh)  # within the raised limit
        elementwise.linear(torch.randn(65, 8, device="cuda").half(), wh)  # a prefill-sized step: cuBLAS
        assert calls == [(2, 8), (17, 8)]
    monkeypatch.setenv("PAGEDSERVE_SMALL_GEMV_ROWS", "65")
    with pytest.raises(ValueError, match="PAGEDSERVE_SMALL_GEMV_ROWS"):
        envs.small_gemv_rows()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# Llama-8B qkv / down / gate_up, Qwen3-0.6B o_proj, SmolLM2-135M (the bundled model) qkv / down / LM head
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (28672, 4096), (1024, 2048), (960, 576), (576, 1536),
                                 (49152, 576)])
@pytest.mark.parametrize("rows", [1, 8, 16, 33, 64])  # 33 and 64: the autotuned launch (32- and 64-row tiles)
def test_gemv_real_shapes_gpu(n, k, rows):
    weight = (torch.randn(n, k, device=DEVICE) * 0.02).bfloat16()
    x = torch.randn(rows, k, device=DEVICE).bfloat16()
    assert _rel_err(gemv(x, weight), x.float() @ weight.float().T) < 1e-2


def test_split_k_comes_from_the_environment_only_where_column_tiles_leave_sms_idle(monkeypatch):
    import importlib

    gemv_mod = importlib.import_module("kernels.gemv")
    cpu = torch.device("cpu")  # counted as an H200's 132 SMs
    assert gemv_mod._config(4096, cpu)[-1] == 1  # default: no split
    monkeypatch.setenv("PAGEDSERVE_GEMV_SPLIT_K", "4")
    assert gemv_mod._config(4096, cpu)[-1] == 4  # 256 column tiles of 16 < 2 per SM: split
    assert gemv_mod._config(6144, cpu)[-1] == 1  # 384 tiles already give every SM two programs
    monkeypatch.setenv("PAGEDSERVE_GEMV_SPLIT_K", "0")
    with pytest.raises(ValueError, match="PAGEDSERVE_GEMV_SPLIT_K"):
        gemv_mod._config(4096, cpu)


def test_the_gemv_is_the_default_for_small_hidden_sizes_under_pdl(monkeypatch):
    """Unset, the GEMV serves models of hidden size <= 2048 when PDL is on (Qwen3-0.6B: 1.44 -> 1.19 ms a
    token on an H200) and never Llama-8B's 4096 (slower there); $PAGEDSERVE_SMALL_GEMV forces either way,
    and a CPU process never takes it."""
    monkeypatch.delenv("PAGEDSERVE_SMALL_GEMV", raising=False)
    assert elementwise.small_gemv_default(1024, pdl=True)
    assert not elementwise.small_gemv_default(4096, pdl=True)
    assert not elementwise.small_gemv_default(1024, pdl=False)
    monkeypatch.setenv("PAGEDSERVE_SMALL_GEMV", "1")
    assert elementwise.small_gemv_default(4096, pdl=False)
    monkeypatch.setattr(elementwise, "_SMALL_GEMV", True)
    assert not elementwise.configure_small_gemv(1024, torch.device("cpu")) and not elementwise._SMALL_GEMV
    monkeypatch.setenv("PAGEDSERVE_SMALL_GEMV", "0")
    assert not elementwise.small_gemv_default(1024, pdl=True)


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_split_k_matches_linear_and_resets_its_counters(split_k, rows, bias):
    """K split over programs: the last of each column tile sums the partials; repeated launches (as
    consecutive layers do) find the counters back at zero, and the sum is the same every time."""
    n, k = 83, 700  # 3 K tiles of 256, the last one partial
    weight = torch.randn(n, k, device=DEVICE)
    b = torch.randn(n, device=DEVICE) if bias else None
    x = torch.randn(rows, k, device=DEVICE)
    ref = torch.nn.functional.linear(x, weight, b)
    first = gemv(x, weight, b, config=(32, 256, 4, 2, split_k))
    assert _rel_err(first, ref) < 1e-6
    assert torch.equal(gemv(x, weight, b, config=(32, 256, 4, 2, split_k)), first)
    assert torch.equal(gemv(x, weight, b, config=(32, 256, 4, 2, 1)), gemv(x, weight, b, config=(32, 256, 4, 2)))


@pytest.mark.parametrize("rows, split_k, block_m", [(1, 1, 16), (16, 1, 16), (20, 2, 32), (32, 1, 64), (64, 1, 64)])
def test_the_row_parallel_launch_matches_linear_at_every_row_count(rows, split_k, block_m):
    """o_proj / down_proj at decode sizes (row_parallel_gemv): 1-16 rows in a 16-row tile, 17-31 with K
    split in two, 32-64 in a 64-row tile; every launch computes x @ W^T."""
    from kernels.gemv import row_parallel_config, row_parallel_gemv

    config, bm = row_parallel_config(rows, torch.float16)
    assert (config[4], bm or max(16, 1 << (rows - 1).bit_length())) == (split_k, block_m)
    assert row_parallel_config(rows, torch.float32)[0][1] == 64  # float32: half-wide K tiles (shared memory)
    x, w = torch.randn(rows, 300, device=DEVICE), torch.randn(72, 300, device=DEVICE)
    assert _rel_err(row_parallel_gemv(x, w), x @ w.T) < 1e-6


def test_row_parallel_matmuls_take_the_gemv_only_on_cuda_at_decode_sizes(monkeypatch):
    from kernels.gemv import takes_row_parallel

    cpu = torch.device("cpu")
    assert not takes_row_parallel(8, 4096, torch.bfloat16, cpu)  # no PDL, no GPU
    monkeypatch.setattr("kernels.gemv.use_pdl", lambda device: True)
    cuda = torch.device("cuda", 0)
    assert takes_row_parallel(64, 4096, torch.bfloat16, cuda) and takes_row_parallel(32, 2048, torch.float32, cuda)
    assert not takes_row_parallel(31, 4096, torch.bfloat16, cuda)  # under 32 rows only where it pushes (TP > 1)
    assert takes_row_parallel(1, 4096, torch.bfloat16, cuda, push=True)
    assert not takes_row_parallel(65, 4096, torch.bfloat16, cuda, push=True)  # a prefill's rows: cuBLAS
    assert not takes_row_parallel(8, 1024, torch.bfloat16, cuda)  # too narrow for 64 column tiles
    monkeypatch.setenv("PAGEDSERVE_ROW_PARALLEL_GEMV", "0")
    assert not takes_row_parallel(64, 4096, torch.bfloat16, cuda)
    monkeypatch.setenv("PAGEDSERVE_ROW_PARALLEL_GEMV", "on")
    with pytest.raises(ValueError, match="PAGEDSERVE_ROW_PARALLEL_GEMV must be 0 or 1"):
        takes_row_parallel(64, 4096, torch.bfloat16, cuda)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("rows", [1, 5, 40])  # 40: the 64-row dot tile
@pytest.mark.parametrize("bias", [False, True])
def test_the_gated_launch_is_silu_of_gate_times_up(dtype, tol, rows, bias):
    """gate_up and SiLU-and-mul in one launch: the weight is [gate | up] (83 features a half: the column
    tiles' edge is masked, and the up half starts mid-tile); each output is silu(x g) * (x u)."""
    from kernels.gemv import gated_gemv

    d, k = 83, 300
    weight = torch.randn(2 * d, k, device=DEVICE).to(dtype)
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    b = torch.randn(2 * d, device=DEVICE).to(dtype) if bias else None
    got = gated_gemv(x, weight, b)
    gate, up = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double()).chunk(2, -1)
    assert got.shape == (rows, d) and got.dtype == dtype
    assert _rel_err(got, torch.nn.functional.silu(gate) * up) < tol


@pytest.mark.parametrize("rows", [3, 64])
def test_the_gated_launch_rounds_as_the_matmul_then_the_activation_kernel(rows):
    """Same tiles, same sums: the fused launch gives bitwise what the GEMV's gate_up output through
    kernels/activation.py's silu_and_mul gives (the activation of the unfused path)."""
    from kernels.activation import silu_and_mul
    from kernels.gemv import gated_config, gated_gemv

    d, k = 96, 256
    weight, x = torch.randn(2 * d, k, device=DEVICE).half(), torch.randn(rows, k, device=DEVICE).half()
    config, block_m = gated_config(rows, torch.float16)
    assert torch.equal(gated_gemv(x, weight), silu_and_mul(gemv(x, weight, config=config, block_m=block_m)))


def test_the_gated_launch_rejects_what_it_cannot_fuse():
    from kernels.gemv import gated_gemv

    with pytest.raises(ValueError, match="even row count"):
        gated_gemv(torch.randn(2, 32, device=DEVICE), torch.randn(7, 32, device=DEVICE))
    with pytest.raises(ValueError, match="at most 64 rows"):
        gated_gemv(torch.randn(65, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE))


def test_gated_mlps_take_the_fused_launch_only_on_cuda_at_decode_sizes(monkeypatch):
    from kernels import gemv as gemv_mod

    cuda = torch.device("cuda", 0)
    assert not gemv_mod.takes_gated(8, 7168, torch.bfloat16, torch.device("cpu"))  # no PDL, no GPU
    monkeypatch.setattr("kernels.gemv.use_pdl", lambda device: True)
    monkeypatch.setattr("kernels.gemv.GATED_MIN_ROWS", 32)
    assert gemv_mod.takes_gated(64, 7168, torch.bfloat16, cuda) and gemv_mod.takes_gated(32, 2048, torch.float32, cuda)
    assert not gemv_mod.takes_gated(31, 7168, torch.bfloat16, cuda)  # under the measured minimum
    assert not gemv_mod.takes_gated(65, 7168, torch.bfloat16, cuda)  # a prefill's rows: cuBLAS
    assert not gemv_mod.takes_gated(64, 1536, torch.bfloat16, cuda)  # too narrow
    monkeypatch.setenv("PAGEDSERVE_GATED_GEMV", "1")
    assert gemv_mod.takes_gated(1, 7168, torch.bfloat16, cuda) and not gemv_mod.takes_gated(65, 7168, torch.bfloat16, cuda)
    monkeypatch.setenv("PAGEDSERVE_GATED_GEMV", "0")
    assert not gemv_mod.takes_gated(64, 7168, torch.bfloat16, cuda)
    monkeypatch.setenv("PAGEDSERVE_GATED_GEMV", "yes")
    with pytest.raises(ValueError, match="PAGEDSERVE_GATED_GEMV must be 0 or 1"):
        gemv_mod.takes_gated(64, 7168, torch.bfloat16, cuda)


def test_the_mlp_routes_decode_steps_to_the_gated_launch(monkeypatch):
    """SiluAndMulMLP: where takes_gated says so, one gated launch gives what gate_up, the activation and
    down_proj give unfused (float32: the same to rounding); elsewhere the unfused path runs."""
    from gpu_workers.models.layers import SiluAndMulMLP
    from kernels import gemv as gemv_mod

    mlp = SiluAndMulMLP(64, 96).to(DEVICE)
    for p in mlp.parameters():
        p.data.copy_(torch.randn_like(p) * 0.2)
    x = torch.randn(5, 64, device=DEVICE)
    unfused = mlp(x)
    calls = []
    real = gemv_mod.gated_gemv
    monkeypatch.setattr("kernels.gemv.takes_gated", lambda rows, n, dtype, device: (rows, n) == (5, 96))
    monkeypatch.setattr("kernels.gemv.gated_gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    assert _rel_err(mlp(x), unfused) < 1e-5 and calls == [(5, 64)]
    assert _rel_err(mlp(x[:4]), unfused[:4]) < 1e-6 and calls == [(5, 64)]  # 4 rows: not taken


def test_matmuls_reduce_their_own_rows_only_where_every_program_fits_the_sms(monkeypatch):
    """takes_reduce: CUDA under PDL, REDUCE_MIN_ROWS-64 rows (the environment can say 1-64 or never), and
    a launch whose column tiles all fit the SMs at once (its programs wait for their peers' tiles)."""
    from kernels import gemv as gemv_mod

    cuda = torch.device("cuda", 0)
    assert not gemv_mod.takes_reduce(64, 4096, torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr("kernels.gemv.use_pdl", lambda device: True)
    monkeypatch.setattr("kernels.gemv._num_sms", lambda device: 132)
    monkeypatch.setattr("kernels.gemv.REDUCE_BY_DEFAULT", False)
    assert not gemv_mod.takes_reduce(64, 4096, torch.bfloat16, cuda)
    monkeypatch.setattr("kernels.gemv.REDUCE_BY_DEFAULT", True)
    assert gemv_mod.takes_reduce(64, 4096, torch.bfloat16, cuda)  # 128 tiles of 32 columns
    assert gemv_mod.reduce_config(64, 4096, torch.bfloat16, cuda) == ((32, 128, 4, 6, 1), 64)
    assert gemv_mod.reduce_config(8, 8192, torch.bfloat16, cuda) == ((64, 128, 4, 6, 1), 16)  # 128 tiles of 64
    assert gemv_mod.reduce_config(8, 4096, torch.float32, cuda)[0][1] == 64  # float32: 64-wide K tiles
    assert gemv_mod.reduce_config(64, 132 * 128 + 1, torch.bfloat16, cuda) is None
    assert not gemv_mod.takes_reduce(64, 132 * 128 + 1, torch.bfloat16, cuda)
    assert not gemv_mod.takes_reduce(gemv_mod.REDUCE_MIN_ROWS - 1, 4096, torch.bfloat16, cuda)
    assert not gemv_mod.takes_reduce(65, 4096, torch.bfloat16, cuda)  # a prefill's rows
    monkeypatch.setenv("PAGEDSERVE_REDUCE_IN_MATMUL", "1")
    assert gemv_mod.takes_reduce(1, 4096, torch.bfloat16, cuda)
    monkeypatch.setenv("PAGEDSERVE_REDUCE_IN_MATMUL", "0")
    assert not gemv_mod.takes_reduce(64, 4096, torch.bfloat16, cuda)
    monkeypatch.setenv("PAGEDSERVE_REDUCE_IN_MATMUL", "on")
    with pytest.raises(ValueError, match="PAGEDSERVE_REDUCE_IN_MATMUL must be 0 or 1"):
        gemv_mod.takes_reduce(64, 4096, torch.bfloat16, cuda)


def test_a_reducing_matmul_refuses_what_would_hang_or_sum_twice():
    from kernels.all_reduce_rms_norm import PeerBuffers
    from kernels.gemv import _launch, reduce_gemv

    peers = PeerBuffers(torch.zeros(2, dtype=torch.int64), 0, 2, 1 << 16, True, (0, 0))
    x, w, residual = torch.zeros(4, 64), torch.zeros(96, 64), torch.zeros(4, 96)
    with pytest.raises(ValueError, match="flag-free protocol, slot 0 or 1"):
        reduce_gemv(x, w, peers, None, residual)
    with pytest.raises(ValueError, match="residual must be a \\[4, 96\\]"):
        reduce_gemv(x, w, peers, 0, residual[:3])
    with pytest.raises(ValueError, match="K unsplit"):
        reduce_gemv(x, w, peers, 0, residual, config=(32, 64, 4, 2, 2))
    with pytest.raises(ValueError, match="no bias"):
        _launch(x, w, torch.zeros(96), None, 2, None, None, False, (peers, 0, residual))
