"""A/B runs of the unconditional digits recipe, and the EBM's refinement gain (K = 0 against the trained K).

Each arm is `configs/digits.yaml` plus `--set` overrides, trained once per seed with `train.py`; every
exported pipeline is then sampled 1,000 times (batch i seeded i) with its sampling K, its training K and
K = 0 (the initializer's proposals and the final denoising step only), and judged on the same samples by the digits
classifier (confident fraction, classes, largest class, copies) and the digits-FID against the training
digits (1,437; the one FID reference of experiments/results/).

Usage:
  python experiments/ab_digits.py --runs_dir runs/ab --seeds 0 1 \
      --arm base= --arm post=train.init_data_target=posterior_mean [--parallel 2] [--output ab.json]

An arm is NAME=OVERRIDE[,OVERRIDE...]; an empty override list is the recipe as it is. A run whose
`pipeline/` exists is not trained again. With --parallel 2 two runs train at once, each on one thread
(OMP_NUM_THREADS=1): on 2 cores that is the most throughput, and the losses do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cdrl import CDRLPipeline
from cdrl.config import load_config
from cdrl.evaluation.digits import digits_split, load_digits_classifier
from cdrl.images import save_grid

# compare.py sits beside this file (also when a test imports this file by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import measure, sample_ebm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name:
        raise SystemExit(f"error: --arm {text!r}: expected NAME=OVERRIDE[,OVERRIDE...]")
    return name, [o for o in overrides.split(",") if o]


def train_command(config: Path, run: Path, seed: int, overrides: list[str]) -> list[str]:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(config),
        "--output_dir",
        str(run),
    ]
    cmd += ["--seed", str(seed)]
    return cmd + (["--set", *overrides] if overrides else [])


def train_all(jobs: list[tuple[Path, list[str]]], parallel: int) -> dict[str, float]:
    """Run the training commands, ``parallel`` at a time, one thread each; wall seconds per run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if parallel > 1 else dict(os.environ)
    pending, running, seconds = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            run, cmd = pending.pop(0)
            run.parent.mkdir(parents=True, exist_ok=True)
            print("+", shlex.join(cmd), flush=True)
            log = open(run.parent / f"{run.name}.train.log", "w")  # noqa: SIM115 (closed below)
            running.append(
                (
                    run,
                    subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                    log,
                    time.time(),
                )
            )
        time.sleep(5)
        for item in list(running):
            run, proc, log, start = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                seconds[str(run)] = time.time() - start
                if proc.returncode != 0:
                    raise SystemExit(
                        f"error: training {run} failed (exit {proc.returncode}); see its log"
                    )
    return seconds


def evaluate_run(
    run: Path,
    num_samples: int,
    batch_size: int,
    classifier,
    train,
    test,
    ks: list[int] | None = None,
    noise_scales: list[float] | None = None,
) -> dict[str, Any]:
    """Score ``num_samples`` samples at each K of ``ks`` (default: the sampling K, the training K, 0),
    and each Langevin noise scale of ``noise_scales`` (default: the exported one)."""
    pipe = CDRLPipeline.from_pretrained(str(run / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    if ks is None:
        train_k = load_config(run / "config.yaml").langevin.n_steps
        ks = list(dict.fromkeys([int(pipe.scheduler.config.n_steps), train_k, 0]))
    result = {}
    for k in ks:
        for noise in noise_scales or [None]:
            if noise is not None:
                pipe.scheduler.register_to_config(noise_scale=noise)
            name = f"K{k}" if noise is None else f"K{k}_noise{noise:g}"
            images = sample_ebm(pipe, k, num_samples, seed=0, batch_size=batch_size)
            result[name] = {
                "K": k,
                "noise_scale": noise,
                **measure(images, classifier, train, test),
            }
            save_grid(images[:100], run / f"samples_{name}.png", nrow=10, upscale=4)
    return result


def markdown(results: dict[str, Any]) -> str:
    rows = [
        "| arm | seed | K | confident | classes | largest | digits-FID (train) | copies |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, seeds in results.items():
        for seed, by_k in seeds.items():
            for r in by_k.values():
                k = (
                    r["K"]
                    if r.get("noise_scale") is None
                    else f"{r['K']} (noise {r['noise_scale']:g})"
                )
                rows.append(
                    f"| {name} | {seed} | {k} | {r['confident_fraction']:.3f} | "
                    f"{r['classes_present']} | {r['max_class_fraction']:.3f} | "
                    f"{r['fid']:.2f} | {r['copy_fraction']:.3f} |"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/digits.yaml")
    parser.add_argument("--runs_dir", type=Path, required=True)
    parser.add_argument("--arm", action="append", required=True, help="NAME=OVERRIDE[,OVERRIDE...]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--parallel", type=int, default=1, choices=(1, 2))
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--output", type=Path, default=None, help="JSON of every figure")
    parser.add_argument(
        "--noise_scale",
        type=float,
        nargs="+",
        default=None,
        help="Langevin noise scales to sample at (default: the exported one)",
    )
    parser.add_argument(
        "--eval_k",
        type=int,
        nargs="+",
        default=None,
        help="K values to sample at (default: the sampling K, the training K and 0)",
    )
    args = parser.parse_args(argv)
    arms = dict(parse_arm(a) for a in args.arm)

    runs = {(name, seed): args.runs_dir / f"{name}-s{seed}" for name in arms for seed in args.seeds}
    jobs = [
        (run, train_command(args.config, run, seed, arms[name]))
        for (name, seed), run in runs.items()
        if not (run / "pipeline").is_dir()
    ]
    seconds = train_all(jobs, args.parallel)

    classifier = load_digits_classifier(None)
    train, _, test, _ = digits_split()
    results: dict[str, Any] = {}
    for (name, seed), run in runs.items():
        results.setdefault(name, {})[seed] = evaluate_run(
            run,
            args.num_samples,
            args.batch_size,
            classifier,
            train,
            test,
            args.eval_k,
            args.noise_scale,
        )
        print(json.dumps({name: {seed: results[name][seed]}}), flush=True)
    table = markdown(results)
    print(table)
    if args.output is not None:
        payload = {
            "arms": arms,
            "seeds": args.seeds,
            "train_seconds": seconds,
            "results": results,
            "command": shlex.join([sys.executable, *sys.argv]),
            "table": table,
        }
        args.output.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
