"""benchmarks/gpu_bench.py, the GPU command, checked where a CPU can: its helpers and the profile part's plumbing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_bench  # noqa: E402


def test_busy_time_is_the_union_of_kernel_intervals():
    # overlapping [0, 4) and [2, 6), nested [7, 9) in [7, 10), a gap from 6 to 7, and one that touches
    assert gpu_bench.busy_us([(2, 6), (0, 4), (7, 10), (8, 9), (10, 12)]) == 6 + 5
    assert gpu_bench.busy_us([]) == 0


@pytest.mark.parametrize(
    "name, kind",
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("void flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
        ("nvjet_tst_128x192_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("aten::addmm", "matmul"),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
            "optimizer and clipping",
        ),
        ("triton_red_fused__log_softmax_nll_loss_forward_3", "loss (log-softmax, NLL)"),
        ("triton_poi_fused__to_copy_7", "dtype casts"),
        ("triton_per_fused_add_native_layer_norm_5", "other fused elementwise and norms (Inductor)"),
        ("Memcpy HtoD (Pageable -> Device)", "copies and fills"),
        ("aten::gelu_backward", "other"),
    ],
)
def test_kernel_kinds_by_name(name, kind):
    assert gpu_bench.kernel_kind(name) == kind


def test_profile_part_runs_on_the_cpu_and_accounts_for_the_step(tmp_path):
    """The --cpu plumbing run of the profile part: a row whose kinds add up to the busy time."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "gpu_bench.py"), "all", "--cpu", "--parts", "profile", "--budget", "300",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (row,) = json.loads((tmp_path / "profile.json").read_text())["rows"]
    kinds = row["kinds_ms_per_step"]
    assert kinds["matmul"] > 0 and kinds["attention"] > 0 and kinds["optimizer and clipping"] > 0
    assert sum(kinds.values()) == pytest.approx(row["device_busy_ms_per_step"], rel=1e-2)
    assert 0 < row["device_busy_ms_per_step"] <= row["ms_per_step"] * 1.5  # self times of a profiled step
    assert row["matmul_tflops"] > 0 and len(row["top_kernels_ms_per_step"]) == 15
    report = (tmp_path / "gpu_cpu_cpu_dryrun.md").read_text()
    assert "## Where one step's time goes" in report and "| matmul |" in report
