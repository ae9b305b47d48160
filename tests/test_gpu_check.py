"""benchmarks/gpu_check.py's CPU-only pieces: the skip without CUDA, one row on the CPU provider, the table."""

import json

import pytest

from benchmarks import gpu_check
from benchmarks.cases import Case
from qcompile.verify import run_model
from qcompile.verify.sessions import cuda_available
from tests.test_targets import feeds, residual_model


def test_without_cuda_it_writes_a_skip_with_the_reason(tmp_path):
    if cuda_available():
        pytest.skip("the CUDA provider is present here: the check would run")
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "CUDA" in result["skipped"] and "models" not in result


def tiny_case() -> Case:
    return Case(name="residual", description="tiny residual conv net", model=residual_model(),
                calibration=feeds(6), evaluation=feeds(2, seed=2), latency_feed=feeds(1, seed=3)[0],
                metric=lambda reference, test: {}, columns=())


def test_rows_and_table_on_the_cpu_provider():
    case = tiny_case()
    cpu_float = gpu_check._concat(list(run_model(case.model, case.evaluation, "cpu")))
    cuda_row = gpu_check.check_target(case, "cuda", "cpu", (1, 4), 3, cpu_float)
    assert cuda_row["compiled_sqnr_vs_cpu_float_db"] > 40
    assert cuda_row["float_sqnr_vs_cpu_float_db"] is None  # float on the same provider: identical (infinite SQNR)
    assert cuda_row["compiled_memcpy_nodes"] == 0 and cuda_row["compiled_cpu_nodes"] == {}  # all CPU: none "fell back"
    assert cuda_row["b4_float_ms"] > 0 and cuda_row["passed"]
    trt_row = gpu_check.check_target(case, "tensorrt", "cpu", (1, 4), 3, cpu_float)
    assert trt_row["structure_passed"] and "b1_float_ms" not in trt_row
    text = gpu_check.table([cuda_row, trt_row], (1, 4))
    assert "| residual | cuda |" in text and "structure passed" in text
