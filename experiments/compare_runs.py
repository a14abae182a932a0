"""Bit-identity of two training runs (issue 16's check that a refactor changed nothing): every value of
``metrics.jsonl`` (``time/*`` excluded) and every tensor of the exported networks and of the last
checkpoint's EMA and networks must be equal, bit for bit.

    OMP_NUM_THREADS=1 python train.py --config digits --max_train_steps 50 --seed 0 --output_dir A \\
        --report_to none --set log.log_every=1      # on the old commit, then again into B on the new one
    python experiments/compare_runs.py A B          # prints IDENTICAL or DIFFERENT (exit code 0 / 1)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

PARTS = ("pipeline/ebm", "pipeline/initializer")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def tensor_files(run: Path) -> list[str]:
    last = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    files = [f"{part}/{WEIGHTS}" for part in PARTS]
    return files + [str(p.relative_to(run)) for p in sorted(last.glob("*.safetensors"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    a, b = metrics(args.run_a), metrics(args.run_b)
    differ = len(a) != len(b) or any(x != y for x, y in zip(a, b, strict=False))
    print(f"metrics: {len(a)} / {len(b)} lines, {sum(map(len, a))} values, equal: {not differ}")
    compared = bad = 0
    for rel in tensor_files(args.run_a):
        ta, tb = load_file(args.run_a / rel), load_file(args.run_b / rel)
        for key in ta:
            compared += 1
            if key not in tb or not torch.equal(ta[key], tb[key]):
                bad += 1
                print(f"differs: {rel} {key}")
    print(f"tensors: {compared} compared, {bad} differ")
    identical = not differ and not bad
    print("IDENTICAL" if identical else "DIFFERENT")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
