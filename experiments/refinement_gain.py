"""The EBM's refinement gain: the same trained model sampled with and without Langevin refinement.

End to end: 1,000 samples with K = 0 at every level (the initializer's proposals and the final Tweedie
step only) against the model's own sampler (its K at the levels it refines: every level, or the
``refine_top`` noisiest) and against K at every level. Per level: K at level t only (K = 0 elsewhere), so each
row is what refining at that one level adds to the initializer-only sampler; and, with ``--probe``, the
level probe (``level_probe.py``: chains started at real, forward-diffused test digits) at K = 0 and at K.
Every row is judged by the independent digits classifier (confident: p >= 0.9) and the digits-FID against
the 1,437 training digits.

    python experiments/refinement_gain.py --pipeline runs/digits --output gain.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from cdrl.data import requantize
from cdrl.evaluation.digits import digits_split, load_digits_classifier
from cdrl.export import load_pipeline
from cdrl.sampling import frozen, langevin_steps, reverse_step, tweedie_denoise

# compare.py and level_probe.py sit beside this file (also when a test imports this file by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import measure  # noqa: E402
from level_probe import probe  # noqa: E402


def sample_per_level(
    pipe: Any, ks: Sequence[int], n: int, *, seed: int = 0, batch_size: int = 500
) -> Tensor:
    """(n, 1, 8, 8) samples in [-1, 1] with ``ks[t]`` Langevin steps at level t; batch i seeded seed + i.
    Mapped to the data's grey levels as the pipeline maps them when the model has ``num_bins``."""
    schedule = pipe.scheduler.schedule
    base = pipe.scheduler.langevin_settings()
    scale = pipe.scheduler.config.data_scale
    chunks = []
    for index, start in enumerate(range(0, n, batch_size)):
        gen = torch.Generator().manual_seed(seed + index)
        x = torch.randn(min(batch_size, n - start), *pipe.sample_shape, generator=gen)
        with frozen(pipe.ebm, pipe.initializer):
            for t in reversed(range(schedule.num_levels)):
                settings = dataclasses.replace(base, n_steps=int(ks[t]), refine_top=None)
                x = reverse_step(
                    pipe.ebm, pipe.initializer, schedule, x, t, settings, generator=gen
                )
            if base.tweedie:
                x = tweedie_denoise(pipe.ebm, schedule, x, base)
        bins = pipe.scheduler.config.get("num_bins")  # a dequantized model: the data's grid
        chunks.append((x / scale if bins is None else requantize(x / scale, bins)).clamp(-1, 1))
    return torch.cat(chunks)


def refinement_gain(
    pipe: Any,
    k: int,
    *,
    num_samples: int = 1000,
    per_level: bool = True,
    refine_tops: Sequence[int] = (),
    probe_images: int = 0,
    seed: int = 0,
    classifier_path: str | Path | None = None,
) -> dict[str, Any]:
    """The end-to-end rows (K = 0 and K everywhere), one row per level refined alone, and the probe.
    ``classifier_path``: the digits classifier's folder (None: the cached default)."""
    classifier = load_digits_classifier(classifier_path)
    x_train, _, x_test, y_test = digits_split()
    levels = pipe.scheduler.schedule.num_levels

    def row(ks: list[int]) -> dict[str, Any]:
        images = sample_per_level(pipe, ks, num_samples, seed=seed)
        return {"ks": ks, **measure(images, classifier, x_train, x_test, classifier_path)}

    result: dict[str, Any] = {"K": k, "num_samples": num_samples, "seed": seed}
    settings = pipe.scheduler.langevin_settings()
    stored = [langevin_steps(settings, t, levels) for t in range(levels)]
    end = {"K0": row([0] * levels), "stored": row(stored)}
    if stored != [k] * levels:
        end[f"K{k}"] = row([k] * levels)
    result["end_to_end"] = end
    # the gain: the model's own sampler (its K, at the levels it refines) against none
    result["fid_ratio_K0_over_stored"] = end["K0"]["fid"] / end["stored"]["fid"]
    if (
        refine_tops
    ):  # K at the N noisiest levels only (the ``refine_top`` sampler), for each N given
        result["top_levels"] = {
            n: row([k if t >= levels - n else 0 for t in range(levels)]) for n in refine_tops
        }
    if per_level:
        result["only_level"] = {
            t: row([k if s == t else 0 for s in range(levels)]) for t in range(levels)
        }
    if probe_images:
        result["probe"] = {
            f"K{kk}": probe(
                pipe,
                x_test[:probe_images],
                y_test[:probe_images],
                classifier,
                settings=dataclasses.replace(settings, n_steps=kk),
                seed=seed,
            )
            for kk in (0, k)
        }
    return result


def markdown(result: dict[str, Any]) -> str:
    k = result["K"]
    lines = [
        "| sampler | confident | digits-FID |",
        "|---|---|---|",
    ]
    for name, r in result["end_to_end"].items():
        label = f"{name} at every level" if name != "stored" else f"as exported {r['ks']}"
        lines.append(f"| {label} | {r['confident_fraction']:.3f} | {r['fid']:.2f} |")
    ratio = result["fid_ratio_K0_over_stored"]
    lines.insert(0, f"FID(K = 0) / FID(as exported): {ratio:.2f}\n")
    for n, r in result.get("top_levels", {}).items():
        lines.append(
            f"| K = {k} at the {n} noisiest levels | {r['confident_fraction']:.3f} | {r['fid']:.2f} |"
        )
    for t, r in result.get("only_level", {}).items():
        lines.append(
            f"| K = {k} at level {t} only | {r['confident_fraction']:.3f} | {r['fid']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pipeline", required=True, help="a run folder or exported digits pipeline"
    )
    parser.add_argument(
        "--k", type=int, default=None, help="K to compare with 0 (default: trained)"
    )
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--no_per_level", action="store_true", help="no K-at-one-level rows")
    parser.add_argument(
        "--refine_tops",
        type=int,
        nargs="*",
        default=[],
        help="also K at the N noisiest levels only, for each N (the refine_top sampler)",
    )
    parser.add_argument(
        "--probe_images", type=int, default=0, help="also the level probe on this many test digits"
    )
    parser.add_argument(
        "--scheduler",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="sampling settings to change first, as in scheduler_config.json (tweedie=false, tweedie_b2=4e-4)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier", default=None, help="digits classifier folder")
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.pipeline, device="cpu")
    for item in args.scheduler:
        key, sep, value = item.partition("=")
        if not sep or key not in pipe.scheduler.config:
            parser.error(
                f"--scheduler {item!r}: give KEY=VALUE with a key of scheduler_config.json"
            )
        pipe.scheduler.register_to_config(**{key: yaml.safe_load(value)})
    k = int(pipe.scheduler.config.n_steps) if args.k is None else args.k
    result = refinement_gain(
        pipe,
        k,
        num_samples=args.num_samples,
        per_level=not args.no_per_level,
        refine_tops=args.refine_tops,
        probe_images=args.probe_images,
        seed=args.seed,
        classifier_path=args.classifier,
    )
    print(markdown(result))
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
