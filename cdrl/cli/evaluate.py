"""``cdrl-evaluate``: sample quality (FID, KID, IS), conditional accuracy, held-out bits/dim, OOD AUROC.

Samples are drawn as ``cdrl-generate`` draws them (sample k from its own generator seeded ``seed + k``),
so the set depends neither on the batch size nor on the number of processes. Under ``accelerate launch``
the samples are split across processes and gathered on the main process, which computes every figure
once (with torch-fidelity's ``calculate_metrics``) and writes one JSON file of the figures, the settings
and the versions. Images are scored as uint8, rounded as the PNG writers round them. Bad input: one line
``error: ...`` on stderr, exit code 2, nothing written.

    cdrl-evaluate --checkpoint runs/cifar10/pipeline --reference cifar10-train --output fid.json
    accelerate launch -m cdrl.cli.evaluate --checkpoint runs/cifar10/pipeline --reference cifar10-train \\
        --metrics fid isc --output fid.json
    cdrl-evaluate --checkpoint runs/digits/pipeline --reference digits-train --num_samples 2000 \\
        --output digits.json     # 8x8 models use the offline digits extractor (cdrl/evaluation/fidelity.py)
    cdrl-evaluate --checkpoint runs/digits --metrics bpd --heldout digits-test --bpd_convergence \\
        --output bpd.json        # held-out bits/dim at K and 4K annealing steps, and whether it converged
    cdrl-evaluate --checkpoint runs/digits_density --metrics bpd --heldout digits-test --output bpd.json
                                 # every level below the top as the initializer's exact Gaussian (variances
                                 # fitted on digits-train), the top level's EBM by AIS; --bpd_gaussian_levels
                                 # sampler: the EBM's conditionals where the model refines
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from cdrl.cli.common import (
    CLIError,
    run_cli,
)
from cdrl.cli.evaluate_plan import (
    CONVERGENCE_FACTOR,
    FIDELITY_METRICS,
    GAUSSIAN_FIT_EXAMPLES,
    SCHEMA,
    Plan,
    build_parser,
    plan_evaluation,
)
from cdrl.evaluation.bpd import (
    CONVERGENCE_TOLERANCE,
    DEFAULT_NUM_CHAINS,
    DEFAULT_NUM_INTERMEDIATE,
    bits_per_dim,
    bpd_convergence,
    fit_level_variances,
    heldout_bpd,
)
from cdrl.evaluation.digits import (
    cache_root,
    digits_accuracy,
    digits_classifier_path,
    load_digits_classifier,
)
from cdrl.evaluation.fidelity import (
    EXTRACTORS,
    Reference,
    check_extractor,
    compute_fidelity,
    load_reference,
    sample_images,
    subset_indices,
    versions,
)
from cdrl.evaluation.ood import ood_report
from cdrl.export import load_pipeline
from cdrl.utils import atomic_write, check_writable, one_line

if TYPE_CHECKING:
    from accelerate import PartialState

T = TypeVar("T")


# ---------------------------------------------------------------- the command


@dataclass
class Inputs:
    """What the main process loads before sampling: reference data and feature-extractor weights."""

    reference: Reference | None = None
    heldout: Reference | None = None
    gaussian_fit: Reference | None = None  # the data that fit the Gaussian levels' variances
    ood: dict[str, Reference] = field(default_factory=dict)
    weights: Path | None = None


def load_inputs(args: argparse.Namespace, plan: Plan) -> Inputs:
    """Load the reference data sets and make sure the extractor's weights are usable.

    Raises:
        DataError / CLIError: data or weights that cannot be used.
    """
    inputs = Inputs()
    chosen = set(plan.metrics)

    def load(spec: str) -> Reference:
        return load_reference(spec, sample_shape=plan.sample_shape, data_dir=args.data_dir)

    if chosen & {"fid", "kid"}:
        inputs.reference = load(args.reference)
    if plan.heldout is not None:
        same = inputs.reference is not None and plan.heldout == args.reference
        inputs.heldout = inputs.reference if same else load(plan.heldout)
    if plan.gaussian_fit is not None:
        same = inputs.reference is not None and plan.gaussian_fit == args.reference
        inputs.gaussian_fit = inputs.reference if same else load(plan.gaussian_fit)
    for spec in dict.fromkeys(args.ood):
        inputs.ood[spec] = load(spec)
    if plan.extractor == "digits":
        inputs.weights = digits_classifier_path(args.digits_classifier)  # trains it when missing
    elif plan.extractor == "inception" and chosen & FIDELITY_METRICS:
        inputs.weights = args.inception_weights
        check_extractor(EXTRACTORS["inception"], inputs.weights)
    return inputs


def _main_first(state: PartialState, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on the main process only; when it fails there, fail with its message on every process."""
    result, error = None, None
    if state.is_main_process:
        try:
            result = fn()
        except (CLIError, ValueError) as err:
            error = one_line(str(err))
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise CLIError(error)
    return result


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_evaluation(args)

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # `accelerate launch --cpu` asks for the CPU (gloo between processes) through this variable, which
    # only AcceleratorState reads by itself.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if args.device is not None and state.num_processes > 1:
        raise CLIError(
            "--device cannot be used under a multi-process launch (each process has its own)"
        )
    device = torch.device(args.device) if args.device is not None else state.device

    # The main process loads the data and the extractor's weights (training the digits classifier on
    # first use) before any sampling, so that bad input fails in seconds, on every process. The
    # output's parent folder is made last, once everything else has been checked.
    def prepare() -> Inputs:
        inputs = load_inputs(args, plan)
        check_writable(args.output)
        return inputs

    inputs = _main_first(state, prepare)
    pipe = load_pipeline(plan.checkpoint, device)

    figures: dict[str, Any] = {}
    details: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    fidelity_settings: dict[str, Any] = {}
    images = None
    if plan.needs_samples:
        start = time.perf_counter()
        images = sample_images(
            pipe,
            plan.labels,
            [args.seed + k for k in range(args.num_samples)],
            guidance_scale=args.guidance_scale,
            num_langevin_steps=args.num_langevin_steps,
            batch_size=args.batch_size,
            state=state,
        )
        seconds["sampling"] = time.perf_counter() - start
    if not state.is_main_process:
        return 0  # the main process computes every figure

    start = time.perf_counter()
    if FIDELITY_METRICS & set(plan.metrics):
        results, fidelity_settings = compute_fidelity(
            images,
            inputs.reference,
            metrics=FIDELITY_METRICS & set(plan.metrics),
            extractor=EXTRACTORS[plan.extractor],
            weights_path=inputs.weights,
            batch_size=args.batch_size,
            cuda=device.type == "cuda",
            cache_root=None if args.no_cache else cache_root() / "fidelity",
        )
        figures.update(results)
    if "accuracy" in plan.metrics:
        classifier = load_digits_classifier(inputs.weights, train_if_missing=False)
        details["accuracy"] = digits_accuracy(images, plan.labels, classifier)
        figures["accuracy"] = details["accuracy"]["accuracy"]
    if plan.needs_samples:
        seconds["sample_metrics"] = time.perf_counter() - start

    if plan.heldout is not None:
        start = time.perf_counter()
        x_heldout = inputs.heldout.data(
            subset_indices(len(inputs.heldout), args.num_examples, args.seed)
        )
        gaussian = _gaussian_levels(args, pipe, plan.gaussian_levels, inputs.gaussian_fit)
        if "bpd" in plan.metrics:
            _bpd(args, pipe, x_heldout, inputs, gaussian, figures, details)
        if "ood" in plan.metrics:
            x_out = {
                spec: ref.data(subset_indices(len(ref), args.num_examples, args.seed))
                for spec, ref in inputs.ood.items()
            }
            details["ood"] = _ood(args, pipe, x_heldout, x_out, inputs, gaussian)
            figures["ood_auroc"] = {
                spec: entry["auroc"]
                for spec, entry in details["ood"]["out_of_distribution"].items()
            }
        seconds["heldout_metrics"] = time.perf_counter() - start

    settings = {
        "checkpoint": str(plan.checkpoint),
        "metrics": plan.metrics,
        "num_samples": args.num_samples if plan.needs_samples else None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "class_labels": None if plan.labels is None else sorted(set(plan.labels)),
        "guidance_scale": args.guidance_scale if plan.labels is not None else None,
        "num_langevin_steps": pipe.scheduler.langevin_settings(
            n_steps=args.num_langevin_steps
        ).n_steps,
        "reference": None if inputs.reference is None else inputs.reference.describe(),
        "heldout": None if inputs.heldout is None else inputs.heldout.describe(),
        "ood": [ref.describe() for ref in inputs.ood.values()],
        "num_examples": args.num_examples,
        "feature_extractor": None if plan.extractor is None else EXTRACTORS[plan.extractor],
        "feature_extractor_weights": None if inputs.weights is None else str(inputs.weights),
        "fidelity": fidelity_settings,
        "num_processes": state.num_processes,
        "device": str(device),
    }
    result = {
        "schema": SCHEMA,
        "metrics": figures,
        "details": details,
        "settings": settings,
        "versions": versions(),
        "seconds": seconds,
    }
    with atomic_write(args.output) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(figures, details.get("bpd_convergence")))
    print(f"wrote {args.output}")
    return 0


def _bpd(
    args: argparse.Namespace,
    pipe: Any,
    x: torch.Tensor,
    inputs: Inputs,
    gaussian: dict[str, Any],
    figures: dict[str, Any],
    details: dict[str, Any],
) -> None:
    """Held-out bits/dim into ``figures`` and ``details``; with --bpd_convergence at K and 4K. ``gaussian``:
    the Gaussian levels' options (``_gaussian_levels``)."""
    heldout = inputs.heldout
    num_bins = heldout.num_bins if heldout.is_image else None
    gaussian_levels = gaussian.get("gaussian_levels", 0)
    steps = args.bpd_num_intermediate or DEFAULT_NUM_INTERMEDIATE
    chains = args.bpd_num_chains or DEFAULT_NUM_CHAINS
    # AIS runs at every tethered level but the Gaussian ones (exact), and once for the top level.
    levels = pipe.scheduler.schedule.num_levels - 1 - gaussian_levels
    gradients = (len(x) * levels + 16) * chains * steps
    extra = f"; then {CONVERGENCE_FACTOR}x that at K = {CONVERGENCE_FACTOR * steps}"
    print(
        f"bits/dim: {len(x)} examples x {levels} levels x {chains} chains x K = {steps} annealing "
        f"steps (+ the top level): about {gradients:,} energy gradients"
        f"{extra if args.bpd_convergence else ''}",
        file=sys.stderr,
    )
    if not args.bpd_convergence:
        details["bpd"] = heldout_bpd(
            pipe,
            x,
            num_bins=num_bins,
            seed=args.seed,
            batch_size=args.batch_size,
            num_intermediate=args.bpd_num_intermediate,
            num_chains=args.bpd_num_chains,
            **gaussian,
        )
        details["bpd"].update(_gaussian_source(inputs.gaussian_fit))
        figures["bpd"], figures["nll_nats"] = (
            details["bpd"].pop("bpd"),
            details["bpd"].pop("nll_nats"),
        )
        return
    check = bpd_convergence(
        pipe,
        x,
        num_bins=num_bins,
        seed=args.seed,
        batch_size=args.batch_size,
        num_intermediate=steps,
        num_chains=chains,
        factor=CONVERGENCE_FACTOR,
        **gaussian,
    )
    report = {k: v for k, v in check.reports[1].items() if k not in ("bpd", "nll_nats")}
    details["bpd"] = {**report, **({} if num_bins is None else {"num_bins": num_bins})}
    details["bpd"].update(_gaussian_source(inputs.gaussian_fit))
    details["bpd_convergence"] = {
        **{k: v for k, v in check._asdict().items() if k != "reports"},
        "tolerance": CONVERGENCE_TOLERANCE,
        "criterion": f"converged: the estimate moves by less than {CONVERGENCE_TOLERANCE:.0%} from K "
        f"to {CONVERGENCE_FACTOR}K annealing steps and |change| <= sqrt(stderr_K^2 + "
        f"stderr_{CONVERGENCE_FACTOR}K^2) (standard errors over examples)",
        "per_level_nats": [r["per_level_nats"] for r in check.reports],
    }
    figures["bpd"], figures["nll_nats"] = check.bpd[1], check.nll_nats[1]
    figures["bpd_stderr"] = check.bpd_stderr[1]
    figures["bpd_converged"] = check.converged


def _ood(
    args: argparse.Namespace,
    pipe: Any,
    x_in: torch.Tensor,
    x_out: dict[str, torch.Tensor],
    inputs: Inputs,
    gaussian: dict[str, Any],
) -> dict[str, Any]:
    """``ood_report`` by the lowest level's energy, or (--ood_score nll) by each example's negative
    log-likelihood under the density bound, with --metrics bpd's settings and the held-out data's grey
    levels for every set (so the sets are scored in the same units)."""
    if args.ood_score == "energy":
        return ood_report(pipe, x_in, x_out, batch_size=args.batch_size)
    heldout = inputs.heldout
    options = {
        "num_bins": heldout.num_bins if heldout.is_image else None,
        "num_intermediate": args.bpd_num_intermediate or DEFAULT_NUM_INTERMEDIATE,
        "num_chains": args.bpd_num_chains or DEFAULT_NUM_CHAINS,
        "batch_size": args.batch_size,
        **gaussian,
    }

    def nll(x: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(args.seed)
        density = bits_per_dim(pipe, x, generator=generator, progress=False, **options)
        return torch.tensor(density["nll_per_example"], dtype=torch.float64)

    report = ood_report(pipe, x_in, x_out, score=nll, score_name="nll")
    report.update({k: v for k, v in options.items() if k != "batch_size"})
    return report


def _gaussian_levels(
    args: argparse.Namespace, pipe: Any, levels: int, fit: Reference | None
) -> dict[str, Any]:
    """The Gaussian-level options of the bpd functions: their number and variances, given or fitted on up
    to ``GAUSSIAN_FIT_EXAMPLES`` examples of ``fit`` (seeded ``args.seed``); {} when every level is the EBM's."""
    if levels == 0:
        return {}
    variances = args.bpd_gaussian_variances
    if variances is None:
        x = fit.data(subset_indices(len(fit), GAUSSIAN_FIT_EXAMPLES, args.seed))
        variances = fit_level_variances(
            pipe,
            x,
            levels,
            num_bins=fit.num_bins if fit.is_image else None,
            generator=torch.Generator().manual_seed(args.seed),
            batch_size=args.batch_size,
        )
        print(
            f"bits/dim: the lowest {levels} levels as the initializer's Gaussians, variances "
            f"{variances[0]:.3g} .. {variances[-1]:.3g} fitted on {len(x)} examples of {fit.spec}",
            file=sys.stderr,
        )
    return {"gaussian_levels": levels, "gaussian_variances": list(variances)}


def _gaussian_source(fit: Reference | None) -> dict[str, Any]:
    """Where fitted Gaussian-level variances came from, for the JSON ({} when none were fitted)."""
    if fit is None:
        return {}
    return {
        "gaussian_variances_fitted_on": fit.spec,
        "gaussian_fit_examples": min(len(fit), GAUSSIAN_FIT_EXAMPLES),
    }


def summary(figures: dict[str, Any], convergence: dict[str, Any] | None = None) -> str:
    """One line of the figures, e.g. 'fid 12.3 | kid 0.0102 ± 0.0011 | isc 7.81 ± 0.12'."""
    parts = []
    if "fid" in figures:
        parts.append(f"fid {figures['fid']:.4g}")
    for name in ("kid", "isc"):
        if f"{name}_mean" in figures:
            parts.append(f"{name} {figures[f'{name}_mean']:.4g} ± {figures[f'{name}_std']:.2g}")
    if "accuracy" in figures:
        parts.append(f"accuracy {figures['accuracy']:.4f}")
    if convergence is not None:
        (k, k4), (b, b4), (e, e4) = (
            convergence[name] for name in ("num_intermediate", "bpd", "bpd_stderr")
        )
        verdict = "converged" if convergence["converged"] else "NOT converged"
        parts.append(
            f"bpd {b4:.4g} ± {e4:.2g} at K = {k4} ({b:.4g} ± {e:.2g} at K = {k}; change "
            f"{convergence['relative_change']:.2%}: {verdict})"
        )
    elif "bpd" in figures:
        parts.append(f"bpd {figures['bpd']:.4g}")
    for spec, value in figures.get("ood_auroc", {}).items():
        parts.append(f"ood auroc vs {spec} {value:.4f}")
    return " | ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cdrl-evaluate`` and ``evaluate.py``: the exit code (2: bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
