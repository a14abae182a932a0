"""Every benchmark script runs with --quick on CPU, prints its table and writes its JSON (issue 7).

No timing is asserted (benchmarks print figures; they are never timed tests). The scripts are imported
by name from benchmarks/ (as ``python benchmarks/NAME.py`` does) and called through ``main(argv)``, with
sizes smaller still than --quick; one test runs a script as a command.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdrl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
CPU = ["--device", "cpu", "--quick"]


@pytest.fixture
def bench(monkeypatch):
    """``bench(name)``: benchmarks/<name>.py as a module (benchmarks/ first on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def run_main(bench, capsys, tmp_path, name: str, args: list[str]) -> tuple[str, dict]:
    output = tmp_path / f"{name}.json"
    assert bench(name).main([*CPU, *args, "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"# {name}: cpu")
    assert "threads" in out.splitlines()[0]
    payload = json.loads(output.read_text())
    assert payload["benchmark"] == name
    assert payload["environment"]["threads"] == torch.get_num_threads()
    return out, payload


def table_rows(out: str) -> list[str]:
    """The lines between the dashes under the header and the notes."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "} and line.strip())
    return [line for line in lines[start + 1 :] if line and not line.startswith(("note:", "wrote"))]


def test_langevin_overhead(bench, capsys, tmp_path):
    args = ["--digits_batches", "4", "--cifar10_batches", "1", "--n_steps", "1", "--rounds", "1"]
    out, payload = run_main(bench, capsys, tmp_path, "langevin_overhead", args)
    assert "overhead %" in out
    rows = table_rows(out)
    assert [row.split()[0] for row in rows] == ["digits", "cifar10"]
    for result in payload["results"]:
        assert result["bare_ms_per_step"] > 0 and result["langevin_ms_per_step"] > 0
        assert result["meets_target"] == (result["overhead"] <= 0.10)


def test_langevin_flops(bench, capsys, tmp_path):
    args = ["--digits_batch", "4", "--cifar10_batch", "1", "--matmul_size", "128"]
    out, payload = run_main(
        bench, capsys, tmp_path, "langevin_flops", [*args, "--n_steps", "1", "--rounds", "1"]
    )
    assert "% of matmul" in out
    digits, cifar = payload["results"]
    # FlopCounterMode counts the convolutions: forward + input-gradient backward = about 2x forward.
    assert digits["gflop_per_step"] > 0 and cifar["gflop_per_step"] > 0
    assert digits["gflops_matmul"] > 0
    for result in (digits, cifar):
        rate_ratio = result["gflops_langevin"] / result["gflops_matmul"]
        assert result["fraction_min"] <= result["fraction"] <= result["fraction_max"]
        assert math.isclose(result["fraction"], rate_ratio, rel_tol=1e-6)


def test_langevin_flops_compiled_copy(bench, capsys, tmp_path):
    """--compile times the folded, compiled sampling copy (eager backend here: the wiring, not speed);
    the FLOPs are counted on the plain network, so they match the uncompiled run."""
    args = ["--digits_batch", "4", "--matmul_size", "128", "--n_steps", "1", "--rounds", "1"]
    _, plain = run_main(bench, capsys, tmp_path, "langevin_flops", [*args, "--only", "digits"])
    out, compiled = run_main(
        bench,
        capsys,
        tmp_path,
        "langevin_flops",
        [*args, "--only", "digits", "--compile", "--compile_backend", "eager"],
    )
    assert "torch.compile'd" in out
    (result,) = compiled["results"]
    assert result["compiled"] and not plain["results"][0]["compiled"]
    assert result["gflop_per_step"] == plain["results"][0]["gflop_per_step"]


def test_sampling_memory_one_fresh_process_per_k(bench, capsys, tmp_path):
    out, payload = run_main(bench, capsys, tmp_path, "sampling_memory", ["--batch", "2"])
    assert "peak growth MiB" in out and "flat" in out
    runs = payload["results"]["runs"]
    assert [run["n_steps"] for run in runs] == [5, 15, 60]
    # K at each refined level (every level, or the recipe's refine_top), plus the Tweedie step if on
    cfg = load_config(ROOT / "configs/digits.yaml")
    refined = cfg.langevin.refine_top or cfg.schedule.num_levels
    expected = [refined * k + int(cfg.langevin.tweedie) for k in (5, 15, 60)]
    assert [run["grad_evals"] for run in runs] == expected
    assert all(run["peak_growth_mib"] >= 0 for run in runs)
    assert isinstance(payload["results"]["flat"], bool)


def test_train_breakdown_marks_every_phase_of_the_real_train_step(bench, capsys, tmp_path):
    args = ["--batch_size", "4", "--iters", "2", "--warmup", "0"]
    # Langevin at every level, so each of the 4 examples runs a chain (the digits default refines only
    # its 2 noisiest levels, which a batch of 4 may not hold)
    args += ["--set", "train.refine_top=null", "langevin.refine_top=null", "langevin.tweedie=true"]
    out, payload = run_main(bench, capsys, tmp_path, "train_breakdown", args)
    for phase in ("proposal", "Langevin", "EBM update", "initializer update", "EMA update"):
        assert phase in out
    results = payload["results"]
    assert results["config"] == "digits" and results["batch_size"] == 4
    assert len(results["iterations"]) == 2
    phases = ("proposal", "langevin", "ebm_update", "init_update", "ema_update")
    for iteration in results["iterations"]:
        assert all(iteration[name] > 0 for name in phases)  # every mark was reached
        assert math.isclose(
            sum(iteration[name] for name in phases), iteration["total"], rel_tol=1e-9
        )
        assert iteration["refused"] == 0.0
    # The clock is uninstalled afterwards: train_step's name is the real function again.
    import cdrl.langevin
    import cdrl.training.step

    assert cdrl.training.step.langevin_refine is cdrl.langevin.langevin_refine


def test_langevin_autocast_patch_runs_train_steps_energy_in_bf16(bench):
    """gpu_cifar10's --bf16_langevin: train_step's energy_fn runs the EBM's convolutions in bf16."""
    from conftest import build_ebm

    import cdrl.training.step
    from cdrl.pipeline import CDRLScheduler
    from cdrl.sampling import level

    common = bench("_common")
    ebm, dtypes = build_ebm(), []
    ebm.conv_in.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    scheduler = CDRLScheduler()
    lvl = level(scheduler.schedule, torch.full((2,), 1), scheduler.langevin_settings())
    y = torch.randn(2, 1, 8, 8)
    original = cdrl.training.step.energy_fn
    with common.langevin_autocast(torch.bfloat16):
        energy = cdrl.training.step.energy_fn(ebm, lvl)(y)
    assert cdrl.training.step.energy_fn is original
    assert energy.dtype == torch.float32
    cdrl.training.step.energy_fn(ebm, lvl)(y)
    assert dtypes == [torch.bfloat16, torch.float32]


def test_throughput(bench, capsys, tmp_path):
    args = [
        "--digits_samples",
        "4",
        "--digits_batch",
        "4",
        "--cifar10_samples",
        "1",
        "--cifar10_batch",
        "1",
    ]
    out, payload = run_main(bench, capsys, tmp_path, "throughput", args)
    assert "samples/s" in out and "50k samples would take" in out
    digits, cifar = payload["results"]
    # the refined levels x K (the sampling K) + Tweedie: the digits recipe K = 3 at its 3 noisiest levels,
    # no Tweedie step; CIFAR-10 6 x 15 + 1
    assert digits["ebm_grads_per_sample"] == 9
    assert cifar["ebm_grads_per_sample"] == 91
    assert digits["samples"] == 4 and cifar["samples"] == 1
    assert math.isclose(digits["projected_s_for_50k"], 50_000 / digits["samples_per_s"])


def test_gpu_cifar10_cpu_fallback_with_the_bf16_path(bench, capsys, tmp_path):
    args = [
        "--batch_sizes",
        "2",
        "--train_iters",
        "1",
        "--warmup",
        "0",
        "--sample_batch",
        "1",
        "--sample_batches",
        "1",
        "--precision",
        "bf16",
        "--channels_last",
    ]
    out, payload = run_main(bench, capsys, tmp_path, "gpu_cifar10", args)
    assert "CPU fallback" in out
    assert [row.split()[0] for row in table_rows(out)] == ["train", "sample"]
    results = payload["results"]
    assert results["settings"] == {
        **results["settings"],
        "precision": "bf16",
        "channels_last": True,
    }
    flops = results["flops_per_example"]
    assert flops["ebm_grad_eval"] > 0 and flops["ebm_update"] > flops["ebm_grad_eval"]
    sample = results["sample"]
    assert sample["ebm_grads_per_sample"] == 91
    assert math.isclose(sample["projected_s_for_50k"], 50_000 / sample["samples_per_s"])
    assert sample["meets_target"] == (sample["projected_s_for_50k"] < 600)
    assert results["train"][0]["batch"] == 2 and results["train"][0]["iterations_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error(bench):
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench("langevin_overhead").main(["--device", "cuda"])


def test_a_script_runs_as_a_command():
    args = ["--digits_batches", "2", "--cifar10_batches", "1", "--n_steps", "1", "--rounds", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "langevin_overhead.py"), *CPU, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "threads 1 (OMP_NUM_THREADS=1)" in done.stdout
    assert "overhead %" in done.stdout
