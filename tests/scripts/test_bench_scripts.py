"""The benchmark scripts at tiny sizes on the CPU: they run end to end for both backends and their JSON
summaries carry the fields BENCHMARKS.md quotes, with positive numbers (no timing thresholds)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts")
sys.path.insert(0, SCRIPTS)

import bench_latency  # noqa: E402
import bench_serve  # noqa: E402
import bench_throughput  # noqa: E402
import make_random_checkpoint as mrc  # noqa: E402

TINY = ["--num-prompts", "3", "--input-len", "8", "--output-len", "3", "--seed", "1"]


def assert_summary(summary: dict, positive: list[str]) -> None:
    for key in positive:
        assert summary[key] > 0, (key, summary[key])
    assert summary["card"] == "CPU" and summary["date"] and summary["command"].startswith("python scripts/")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """SmolLM2-135M's shape with 2 layers, bf16, sharded (small shards: the index is exercised too)."""
    out = str(tmp_path_factory.mktemp("ckpt") / "smollm2")
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "make_random_checkpoint.py"), "--arch", "smollm2-135m",
                    "--num-layers", "2", "--out", out, "--shard-size-gb", "0.04", "--device", "cpu"], check=True)
    return out


@pytest.mark.parametrize("arch", sorted(mrc.ARCHS))
def test_parameter_shapes_are_transformers_own(arch):
    """Names and shapes match transformers' model built from the written config.json (on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = mrc.make_config(arch, num_layers=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    ours = dict(mrc.parameter_shapes(config))
    theirs = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied lm_head is not listed twice
    assert ours == theirs


def test_weight_bytes_of_llama_8b_is_the_published_size():
    assert mrc.weight_bytes(mrc.make_config("llama-3.1-8b")) == 8_030_261_248 * 2


def test_checkpoint_loads_in_transformers_with_an_exact_vocabulary(checkpoint):
    from transformers import AutoTokenizer

    files = sorted(os.listdir(checkpoint))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 2
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert len(tokenizer) == 49152
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)  # SmolLM2-Instruct's ids
    assert "t17" in tokenizer.decode([17])


def test_make_random_checkpoint_config_only(tmp_path):
    out = str(tmp_path / "qwen3")
    mrc.write_checkpoint(mrc.parse_args(["--arch", "qwen3-0.6b", "--out", out, "--config-only"]))
    assert not any(f.endswith(".safetensors") for f in os.listdir(out))
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["head_dim"], config["tie_word_embeddings"], config["vocab_size"]) == (128, True, 151936)


@pytest.mark.parametrize("backend", ["pagedserve", "hf"])
def test_bench_throughput(checkpoint, tmp_path, backend):
    out = str(tmp_path / "t.json")
    summary = bench_throughput.main(["--backend", backend, "--model", checkpoint, *TINY, "--output-len-range", "2", "4",
                                     "--num-warmup-prompts", "1", "--hf-batch-size", "2", "--max-model-len", "64",
                                     "--disable-tqdm", "--output-json", out])
    assert summary == json.load(open(out))
    assert_summary(summary, ["elapsed_s", "requests_per_s", "total_tokens_per_s", "output_tokens_per_s"])
    assert summary["num_output_tokens"] == summary["num_requested_output_tokens"]


@pytest.mark.parametrize("backend", ["pagedserve", "hf"])
def test_bench_latency(checkpoint, backend):
    summary = bench_latency.main(["--backend", backend, "--model", checkpoint, "--input-len", "8", "--output-len", "8",
                                  "--num-iters", "1", "--warmup-output-len", "2", "--bandwidth-gib", "0.25"])
    assert_summary(summary, ["first_token_ms", "decode_ms_per_token", "weight_bytes", "copy_bandwidth_gb_per_s",
                             "floor_ms_per_token", "fraction_of_floor"])
    assert summary["weight_bytes"] == mrc.weight_bytes(json.load(open(os.path.join(checkpoint, "config.json"))), "float32")


def test_bench_serve_sweep_against_hf_server(checkpoint, tmp_path):
    csv_path = tmp_path / "sweep.csv"
    rows = bench_serve.main(["--backend", "hf", "--model", checkpoint, *TINY, "--sweep-concurrency", "1,2",
                             "--sweep-csv", str(csv_path), "--sweep-png", str(tmp_path / "sweep.png"),
                             "--output-json", str(tmp_path / "s.json")])
    assert [r["max_concurrency"] for r in rows] == [1, 2]
    for row in rows:
        assert row["failed"] == 0 and row["completed"] == 3 and row["total_output_tokens"] == 9
        assert_summary(row, ["request_throughput", "output_throughput"] +
                       [f"{s}_{m}_ms" for s in ("mean", "median", "p99") for m in ("ttft", "tpot", "itl")])
    assert len(csv_path.read_text().splitlines()) == 3


def test_bench_serve_against_the_pagedserve_server(checkpoint):
    (row,) = bench_serve.main(["--backend", "pagedserve", "--model", checkpoint, *TINY, "--max-concurrency", "2",
                               "--request-rate", "20", "--server-arg=--max-model-len=64"])
    assert row["failed"] == 0 and row["total_output_tokens"] == 9
    assert_summary(row, ["output_throughput", "median_ttft_ms", "median_tpot_ms", "median_itl_ms"])


def test_bench_attention_reports_kernels_that_agree_with_sdpa(tmp_path):
    """The CPU smoke mode (interpreter, float32, tiny shapes) times every kind of row, and on each the
    paged kernels' output matches SDPA's on the same context: the table's rel err column is small."""
    out = tmp_path / "attention.json"
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_attention.py"), "--device", "cpu", "--iters", "1",
                    "--output-json", str(out)], check=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})
    summary = json.load(open(out))
    assert_summary(summary, [])
    rows = summary["rows"]
    assert {r["kind"] for r in rows} == {"decode", "prefill", "chunk"}
    for row in rows:
        assert row["rel_err"] < 1e-5, row
        assert row["ours_us"] > 0 and row["sdpa_us"] > 0 and row["ours_rate"] > 0, row
    sweep = tmp_path / "sweep.json"
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_attention.py"), "--device", "cpu", "--iters", "1",
                    "--decode-sweep", "--output-json", str(sweep)], check=True, timeout=120,
                   env={**os.environ, "TRITON_INTERPRET": "1"})
    (row,) = json.load(open(sweep))["rows"]
    assert set(row["us_by_splits"]) == {"auto", "1", "2", "4", "8", "16"} and min(row["us_by_splits"].values()) > 0
    assert row["best"]["us"] == min(cell["us"] for cell in row["grid"])  # the best of every (splits, tile) pair


def test_bench_norm_prologue_variants_that_do_the_whole_norm_match_torch():
    """The kernel variants behind keeping the RMSNorm its own launch (BENCHMARKS.md, session 19): the two
    that apply the whole norm in the GEMV's K loop compute RMSNorm(x) W^T (--check, interpreter, float32);
    a wrong sum of squares or a missed g would show."""
    run = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_norm_prologue.py"), "--device", "cpu",
                          "--check"], check=True, timeout=120, capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    errs = [float(e) for e in re.findall(r"rel err ([0-9.e+-]+)", run.stdout)]
    assert len(errs) == 2 and max(errs) < 1e-5, run.stdout


def test_bench_sampling_times_every_path_for_every_setting():
    """The CPU smoke mode of the sampling benchmark prints, per filter setting, the four paths' times
    (sort, top-p search, search + Gumbel race, Triton kernel; GPU-alone times are nan without a GPU)."""
    run = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_sampling.py"), "--device", "cpu",
                          "--vocab", "300", "--batch-sizes", "1", "--iters", "1"], check=True, timeout=120,
                         capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    rows = [line for line in run.stdout.splitlines() if line.split()[:2] == ["300", "1"]]
    assert len(rows) == 5
    for row in rows:
        times = [float(t) for t in re.findall(r"([0-9.]+) \[", row)]
        assert len(times) == 4 and all(t > 0 for t in times), row


def test_bench_top_p_finds_the_same_thresholds_with_every_pivot_count():
    """The top-p search benchmark times 16, 8, 4 and 2 pivots a pass (passes to match); under the
    interpreter every setting finds the shipped setting's thresholds (a change of setting changes
    no kept set), and each is timed."""
    run = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_top_p.py"), "--device", "cpu", "--vocab", "1000",
                          "--batch-sizes", "2", "--iters", "1"], check=True, timeout=120, capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    (row,) = [line.split() for line in run.stdout.splitlines() if line.split()[:1] == ["2"]]
    assert len(row) == 5 and all(float(t) > 0 for t in row[1:]), run.stdout  # no "(n differ)"


def test_bench_scheduler_schedules_every_running_request_each_step(tmp_path):
    """The scheduler benchmark drives the real Scheduler: in steady decode every running request gets
    one token per step (continuous batching), and each phase's time is reported."""
    out = tmp_path / "scheduler.json"
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_scheduler.py"), "--num-requests", "16", "--steps",
                    "20", "--rounds", "1", "--output-json", str(out)], check=True, timeout=120)
    summary = json.load(open(out))
    assert_summary(summary, [])
    decode = summary["results"]["decode"]
    assert decode["tokens_per_step"] == 16
    for phase in ("update", "schedule", "plan_latency", "total"):
        assert decode[phase] > 0, phase


def test_bench_prepare_is_deterministic_and_reports_each_phase(tmp_path):
    """The worker host-side benchmark: phases timed, and --digest (a hash of every step's inputs and
    results, for checking that an optimization changed nothing) is the same on a rerun."""
    cmd = [sys.executable, os.path.join(SCRIPTS, "bench_prepare.py"), "--num-requests", "16", "--steps", "10",
           "--warmup", "2", "--repeats", "1"]
    subprocess.run(cmd + ["--output-json", str(tmp_path / "t.json")], check=True, timeout=120)
    timed = json.load(open(tmp_path / "t.json"))
    assert_summary(timed, [])
    for workload in ("decode", "mixed"):
        assert all(timed[workload][phase] > 0 for phase in ("inputs", "launch", "finish", "total"))
    digests = []
    for i in range(2):
        subprocess.run(cmd + ["--digest", "--output-json", str(tmp_path / f"d{i}.json")], check=True, timeout=120)
        digests.append(json.load(open(tmp_path / f"d{i}.json")))
    assert digests[0]["decode_digest"] == digests[1]["decode_digest"]
    assert digests[0]["mixed_digest"] == digests[1]["mixed_digest"] != digests[0]["decode_digest"]
