"""Long-run Langevin chains at every level: do chains 100x longer than sampling's diverge? (DRL Sec. 1, 5)

For each level t, real held-out data are diffused to a true pair (x_t, x_{t+1}); the level's chain starts
where sampling starts it (the initializer's proposal, or x_{t+1} without one) and runs --num_steps Langevin
steps on the recovery conditional p(y | x_{t+1}) with the trained settings. At steps 0, 15, 50, 100, 300,
1000, 1500 it records the mean energy, the distance moved from the start, the RMS distance to the true x_t,
the largest |x|, and at level 0 on digits the independent classifier's judgement of the (clamped) chain
state and of its Tweedie-denoised version.

Usage: python experiments/long_run.py --checkpoint runs/digits/pipeline [--num_steps 1500]
       [--num_images 100] [--levels 0,1,2] [--seed 0] [--output long_run.json] [--plot long_run.png]
       [--grid long_run_level0.png] [--classifier PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdrl.config import load_config
from cdrl.data import load_dataset
from cdrl.images import save_grid
from cdrl.langevin import recovery_energy
from cdrl.sampling import energy_fn, frozen, level, propose, refine, tweedie_denoise
from cdrl.utils import expand_as, git_sha, parse_int_list

CHECKPOINTS = (0, 15, 50, 100, 300, 1000, 1500)  # steps at which the chain is measured


def held_out_data(checkpoint: Path, num_images: int) -> tuple[Tensor, str]:
    """The first ``num_images`` items of the test split of the data the pipeline was trained on."""
    config_path = checkpoint / "training_config.yaml"
    if not config_path.is_file():
        raise SystemExit(f"error: {config_path} is missing; it names the training data")
    cfg = load_config(config_path)
    dataset = load_dataset(cfg.data, split="test")
    count = min(num_images, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)]), cfg.data.name


def run_level(
    pipe,
    x0: Tensor,
    t: int,
    *,
    num_steps: int,
    generator: torch.Generator,
    classifier=None,
) -> tuple[list[dict[str, Any]], dict[int, Tensor]]:
    """One level's long chain from the trained starting point; statistics at ``CHECKPOINTS``.

    Args:
        pipe: a ``CDRLPipeline``.
        x0: (n, ...) held-out data in data units (before data_scale).
        t: the level.
        num_steps: Langevin steps.
        generator: random source (forward noise, proposal, Langevin noise).
        classifier: a digits classifier, to judge level-0 states (None: skip).

    Returns:
        (rows, states): one dict per recorded step, and the chain's x at those steps (level 0 only).
    """
    schedule, settings = pipe.scheduler.schedule, pipe.scheduler.langevin_settings()
    data_scale = float(pipe.scheduler.config.data_scale)
    n = x0.shape[0]
    steps = torch.full((n,), t, dtype=torch.long)
    lvl = level(schedule, steps, settings)
    scale = expand_as(lvl.scale, x0)

    # A true pair: x_t ~ q(x_t | x_0), x_{t+1} ~ q(x_{t+1} | x_t) (DDPM Eq. (2), (4)).
    noise = torch.randn(x0.shape, generator=generator)
    x_t = schedule.q_sample(x0 * data_scale, steps, noise)
    alpha = float(schedule.alphas[t + 1])
    eps = torch.randn(x0.shape, generator=generator)
    x_next = math.sqrt(alpha) * x_t + math.sqrt(1 - alpha) * eps

    rows: list[dict[str, Any]] = []
    states: dict[int, Tensor] = {}
    record_at = {k for k in CHECKPOINTS if k <= num_steps} | {num_steps}
    with frozen(pipe.ebm, pipe.initializer):
        fn = energy_fn(pipe.ebm, lvl)
        y0 = propose(pipe.initializer, x_next, lvl, generator=generator)

        def record(k: int, y: Tensor) -> None:
            if k not in record_at:
                return
            with torch.no_grad():
                raw = pipe.ebm(y, lvl.noise_level)  # E(y, t), untempered
                tempered = fn(y)
                total = recovery_energy(tempered, y, x_next, lvl.sigma, lvl.tether)
            x = y / scale
            row = {
                "step": k,
                "energy": raw.mean().item(),
                "energy_std": raw.std().item(),
                "recovery_energy": total.mean().item(),
                "move_rms": (x - y0 / scale).pow(2).mean().sqrt().item(),
                "error_rms": (x - x_t).pow(2).mean().sqrt().item(),
                "max_abs": x.abs().max().item(),
            }
            if t == 0:
                states[k] = (x / data_scale).clamp(-1, 1)
                if classifier is not None:
                    row.update(judge(classifier, x / data_scale, prefix=""))
                    denoised = tweedie_denoise(pipe.ebm, schedule, x, settings) / data_scale
                    row.update(judge(classifier, denoised, prefix="tweedie_"))
            rows.append(row)

        record(0, y0)
        refine(
            fn,
            y0,
            x_next,
            lvl,
            n_steps=num_steps,
            noise=settings.noise,
            noise_scale=settings.noise_scale,
            generator=generator,
            callback=lambda k, y: record(k + 1, y),
        )
    return rows, states


def judge(classifier, images: Tensor, *, prefix: str) -> dict[str, float]:
    """The digits classifier's confident fraction (p >= 0.9) and mean top probability."""
    from cdrl.evaluation.digits import judge_digits

    judged = judge_digits(images.clamp(-1, 1), classifier)
    return {
        f"{prefix}confident": judged["confident_fraction"],
        f"{prefix}mean_max_prob": judged["mean_max_probability"],
    }


def print_table(levels: dict[int, list[dict[str, Any]]], reference: dict | None) -> None:
    header = f"{'level':>5} {'step':>5} {'energy':>9} {'U(y)':>11} {'moved':>7} {'err x_t':>7}"
    header += f" {'max|x|':>7}"
    extra = reference is not None
    if extra:
        header += f" {'conf':>5} {'p_max':>5} {'conf+T':>6}"
    print(header)
    for t, rows in levels.items():
        for row in rows:
            line = (
                f"{t:>5} {row['step']:>5} {row['energy']:>9.3f} {row['recovery_energy']:>11.1f} "
                f"{row['move_rms']:>7.3f} {row['error_rms']:>7.3f} {row['max_abs']:>7.2f}"
            )
            if extra and "confident" in row:
                line += (
                    f" {row['confident']:>5.2f} {row['mean_max_prob']:>5.2f} "
                    f"{row['tweedie_confident']:>6.2f}"
                )
            print(line)
    if extra:
        print(
            f"real held-out digits: confident {reference['confident']:.2f}, "
            f"mean p_max {reference['mean_max_prob']:.2f}; true x_0 (diffused to level 0): "
            f"confident {reference['x0_confident']:.2f}"
        )
    print(
        "energy: E(y, t) (network output, lower = likelier); U(y): the chain's target energy "
        "E / s_t^2 + tether; moved / err x_t: RMS per dimension from the start / from the true x_t"
    )


def plot(levels: dict[int, list[dict[str, Any]]], path: Path) -> bool:
    """Energy drift, error and (level 0) confidence against the step; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [("energy", "E(y, t) - E at step 0"), ("error_rms", "RMS distance to true x_t")]
    has_conf = any("confident" in row for rows in levels.values() for row in rows)
    fig, axes = plt.subplots(1, len(panels) + has_conf, figsize=(5 * (len(panels) + has_conf), 4))
    for ax, (key, title) in zip(axes, panels, strict=False):
        for t, rows in levels.items():
            steps = [max(r["step"], 1) for r in rows]
            values = [r[key] - (rows[0][key] if key == "energy" else 0.0) for r in rows]
            ax.plot(steps, values, marker="o", label=f"level {t}")
        ax.set_xscale("log")
        ax.set_xlabel("Langevin step (step 0 drawn at 1)")
        ax.set_title(title)
        ax.axvline(15, color="grey", linestyle=":", linewidth=1)
        ax.legend(fontsize=7)
    if has_conf:
        ax = axes[-1]
        rows = next(rows for rows in levels.values() if "confident" in rows[0])
        steps = [max(r["step"], 1) for r in rows]
        ax.plot(steps, [r["confident"] for r in rows], marker="o", label="chain state")
        ax.plot(steps, [r["tweedie_confident"] for r in rows], marker="s", label="+ Tweedie")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_title("level 0: classifier confident fraction")
        ax.axvline(15, color="grey", linestyle=":", linewidth=1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a saved CDRLPipeline")
    parser.add_argument("--num_steps", type=int, default=1500, help="Langevin steps per level")
    parser.add_argument("--num_images", type=int, default=100, help="held-out images per level")
    parser.add_argument("--levels", type=str, default=None, help="levels to run, e.g. 0,1 (all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier", type=Path, default=None, help="digits classifier dir")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot")
    parser.add_argument("--grid", type=Path, default=None, help="level-0 states as a PNG grid")
    args = parser.parse_args(argv)
    if args.num_steps < 1:
        parser.error("--num_steps must be >= 1")

    from cdrl import CDRLPipeline

    pipe = CDRLPipeline.from_pretrained(str(args.checkpoint))
    pipe.set_progress_bar_config(disable=True)
    x0, data_name = held_out_data(args.checkpoint, args.num_images)
    num_levels = pipe.scheduler.schedule.num_levels
    chosen = parse_int_list(args.levels) if args.levels else list(range(num_levels))
    if any(not 0 <= t < num_levels for t in chosen):
        parser.error(f"--levels must lie in 0..{num_levels - 1}")

    classifier = reference = None
    if data_name == "digits" and 0 in chosen:
        from cdrl.evaluation.digits import load_digits_classifier

        classifier = load_digits_classifier(args.classifier)
        reference = judge(classifier, x0, prefix="")
        ab0 = float(pipe.scheduler.schedule.alphas_cumprod[0])
        noisy = ab0**0.5 * x0 + (1 - ab0) ** 0.5 * torch.randn(
            x0.shape, generator=torch.Generator().manual_seed(args.seed)
        )
        reference.update(judge(classifier, noisy, prefix="x0_"))

    levels: dict[int, list[dict[str, Any]]] = {}
    seconds: dict[int, float] = {}
    states: dict[int, Tensor] = {}
    for t in chosen:
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed * 1000 + t)
        levels[t], level_states = run_level(
            pipe, x0, t, num_steps=args.num_steps, generator=generator, classifier=classifier
        )
        states.update(level_states)
        seconds[t] = time.perf_counter() - start
        print(f"level {t}: {args.num_steps} steps in {seconds[t]:.0f} s", flush=True)

    print_table(levels, reference)
    result = {
        "checkpoint": str(args.checkpoint),
        "data": data_name,
        "num_images": int(x0.shape[0]),
        "num_steps": args.num_steps,
        "sampling_steps": pipe.scheduler.langevin_settings().n_steps,
        "seed": args.seed,
        "levels": {str(t): rows for t, rows in levels.items()},
        "reference": reference,
        "seconds": {str(t): s for t, s in seconds.items()},
        "git": git_sha(),
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    if args.plot is not None and not plot(levels, args.plot):
        print("matplotlib is not installed: no plot written")
    if args.grid is not None and states:
        steps = sorted(states)
        per_row = min(10, x0.shape[0])
        rows = torch.cat([states[k][:per_row] for k in steps])
        save_grid(rows, args.grid, nrow=per_row, upscale=4)
        print(f"grid rows: level-0 states at steps {steps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
