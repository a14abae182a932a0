"""experiments/compare_runs.py: the bit-identity check of issue 16 says IDENTICAL only when every logged
value and every saved tensor is equal."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from experiment_scripts import load_experiment
from safetensors.torch import save_file

compare_runs = load_experiment("compare_runs")


def _run(folder: Path, loss: float, weight: float) -> Path:
    for part in ("pipeline/ebm", "pipeline/initializer", "checkpoint-4"):
        (folder / part).mkdir(parents=True)
    rows = [{"step": 4, "ebm/loss": loss, "time/elapsed_s": 1.0 + loss}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tensors = {"w": torch.full((3,), weight)}
    for part in ("pipeline/ebm", "pipeline/initializer"):
        save_file(tensors, str(folder / part / "diffusion_pytorch_model.safetensors"))
    save_file(tensors, str(folder / "checkpoint-4" / "ema.safetensors"))
    return folder


def test_identical_runs_pass_and_any_difference_fails(tmp_path, capsys):
    a = _run(tmp_path / "a", 0.5, 1.0)
    assert compare_runs.main([str(a), str(_run(tmp_path / "b", 0.5, 1.0))]) == 0
    assert compare_runs.main([str(a), str(_run(tmp_path / "c", 0.5000001, 1.0))]) == 1
    assert compare_runs.main([str(a), str(_run(tmp_path / "d", 0.5, 1.0 + 2**-20))]) == 1
    assert capsys.readouterr().out.count("IDENTICAL") == 1
