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

from cdrl.checks import MAX_LANGEVIN_STEPS, MAX_SAMPLES, check_device
from cdrl.cli.common import (
    ArgumentParser,
    CLIError,
    check_finite,
    check_upper_bounds,
    requested_classes,
    run_cli,
)
from cdrl.evaluation.digits import (
    cache_root,
    digits_accuracy,
    digits_classifier_path,
    load_digits_classifier,
)
from cdrl.evaluation.fidelity import (
    DIGITS_SHAPE,
    EXTRACTORS,
    Reference,
    check_extractor,
    compute_fidelity,
    load_reference,
    reference_choices,
    sample_images,
    subset_indices,
    versions,
)
from cdrl.evaluation.likelihood import (
    CONVERGENCE_TOLERANCE,
    DEFAULT_NUM_CHAINS,
    DEFAULT_NUM_INTERMEDIATE,
    bpd_convergence,
    heldout_bpd,
)
from cdrl.evaluation.ood import ood_report
from cdrl.export import load_pipeline, read_model_config, resolve_checkpoint
from cdrl.utils import atomic_write, check_writable, one_line

if TYPE_CHECKING:
    from accelerate import PartialState

DEFAULT_NUM_SAMPLES = 50_000  # as the papers report FID / IS
METRICS = ("fid", "kid", "isc", "accuracy", "bpd", "ood")
DEFAULT_METRICS = ("fid", "kid", "isc")
FIDELITY_METRICS = {"fid", "kid", "isc"}
SAMPLE_METRICS = FIDELITY_METRICS | {"accuracy"}  # metrics of generated samples
HELDOUT_METRICS = {"bpd", "ood"}  # metrics of held-out real data under the model
SCHEMA = "cdrl-evaluate/1"

T = TypeVar("T")
CONVERGENCE_FACTOR = 4  # --bpd_convergence: the estimate at K and at 4K annealing steps
DIGITS_MINUTES = 3  # the default bpd of the 360 digits test images, 12 levels: 2:52 measured on 1 thread


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (usage errors are one-line CLIErrors)."""
    parser = ArgumentParser(prog="cdrl-evaluate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, type=Path,
        help="a pipeline folder (model_index.json), or a run folder holding one in pipeline/",
    )  # fmt: skip
    parser.add_argument(
        "--metrics", nargs="+", choices=METRICS, default=list(DEFAULT_METRICS), metavar="M",
        help="any of fid kid isc (torch-fidelity), accuracy (conditional digits: the classifier reads "
        "the requested class), bpd (held-out bits/dim), ood (OOD AUROC); default: fid kid isc",
    )  # fmt: skip
    parser.add_argument(
        "--num_samples", type=int, default=DEFAULT_NUM_SAMPLES, metavar="N",
        help=f"generated samples (default {DEFAULT_NUM_SAMPLES:,}, as the papers use)",
    )  # fmt: skip
    parser.add_argument(
        "--reference", metavar="R",
        help="real data for fid / kid (and, without --heldout, for bpd / ood): a registered data set "
        f"({reference_choices()}), a folder of images, or a config file configs/NAME.yaml[:train|:test]",
    )  # fmt: skip
    parser.add_argument(
        "--heldout", metavar="R",
        help="held-out real data for bpd, and the in-distribution data for ood (default: --reference)",
    )  # fmt: skip
    parser.add_argument(
        "--ood", nargs="+", default=[], metavar="R", help="out-of-distribution data sets for ood"
    )
    parser.add_argument(
        "--num_examples", type=int, default=None, metavar="N",
        help="bpd / ood: at most N examples of each data set (a seeded random subset; default all)",
    )  # fmt: skip
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--class_labels", type=int, nargs="+", metavar="C",
        help="class-conditional models: sample k gets label C[k mod len(C)] (default: unconditional)",
    )  # fmt: skip
    which.add_argument(
        "--all_classes", action="store_true", help="cycle through every class 0..n-1"
    )
    parser.add_argument(
        "--guidance_scale", type=float, default=1.0, metavar="S",
        help="classifier-free guidance, diffusers' meaning: 1 = off, > 1 stronger (w = S - 1)",
    )  # fmt: skip
    parser.add_argument(
        "--num_langevin_steps", type=int, default=None, metavar="K",
        help="Langevin steps per noise level (default: the trained value)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="sample k uses seed + k (default 0)")
    parser.add_argument(
        "--batch_size", type=int, default=256,
        help="samples per forward, in sampling and in feature extraction (default 256)",
    )  # fmt: skip
    parser.add_argument(
        "--output", required=True, type=Path, help="the JSON file of figures, settings, versions"
    )
    parser.add_argument(
        "--feature_extractor", choices=sorted(EXTRACTORS), default=None,
        help="inception (torch-fidelity's standard InceptionV3) or digits (the offline 8x8 digits "
        "classifier); default: digits for 1x8x8 models, inception otherwise",
    )  # fmt: skip
    parser.add_argument(
        "--inception_weights", type=Path, metavar="PATH",
        help="a local copy of torch-fidelity's InceptionV3 weights (default: download on first use)",
    )  # fmt: skip
    parser.add_argument(
        "--digits_classifier", type=Path, metavar="PATH",
        help="the digits classifier folder (default $CDRL_CACHE_DIR/digits_classifier, trained on "
        "first use; retrain with python -m cdrl.evaluation.digits --output PATH)",
    )  # fmt: skip
    parser.add_argument(
        "--data_dir", type=Path, metavar="DIR",
        help="root of local copies of torch-fidelity's registered data sets (cifar10-train, ...)",
    )  # fmt: skip
    parser.add_argument(
        "--no_cache", action="store_true",
        help="do not cache reference features and statistics (cached under $CDRL_CACHE_DIR/fidelity)",
    )  # fmt: skip
    parser.add_argument(
        "--bpd_num_intermediate", type=int, default=None, metavar="K",
        help=f"bpd: annealing steps per level (default {DEFAULT_NUM_INTERMEDIATE}). The cost is about "
        "examples x (levels - 1) x chains x K energy gradients, plus 16 x chains x K for the top level: "
        f"at the defaults, the 360 digits test images through a 12-level model take ~{DIGITS_MINUTES} "
        "min on 2 CPU cores; it grows in proportion to each factor",
    )  # fmt: skip
    parser.add_argument(
        "--bpd_num_chains", type=int, default=None, metavar="M",
        help=f"bpd: AIS chains per example and level (default {DEFAULT_NUM_CHAINS})",
    )  # fmt: skip
    parser.add_argument(
        "--bpd_convergence", action="store_true",
        help=f"bpd: estimate at K and at {CONVERGENCE_FACTOR}K annealing steps (same examples and "
        "dequantization, independent AIS seeds) and report both with their standard errors, the "
        f"relative change and whether it converged (moved by < {CONVERGENCE_TOLERANCE * 100:g}%% and agrees "
        f"within the standard errors); the {CONVERGENCE_FACTOR}K run costs {CONVERGENCE_FACTOR}x the "
        f"K run, {CONVERGENCE_FACTOR + 1}x a plain bpd in all; the reported bpd is the "
        f"{CONVERGENCE_FACTOR}K figure",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None,
        help="torch device (default: the process's accelerate device: cuda if available)",
    )  # fmt: skip
    return parser


@dataclass
class Plan:
    """What to compute, checked against the flags and the checkpoint before any weights are loaded."""

    checkpoint: Path
    metrics: list[str]
    sample_shape: tuple[int, ...]
    labels: list[int] | None  # one class label per sample, or None (unconditional)
    extractor: str | None  # a key of EXTRACTORS, when a sample metric needs one
    heldout: str | None  # the spec of the held-out data (bpd, ood)

    @property
    def needs_samples(self) -> bool:
        return bool(SAMPLE_METRICS & set(self.metrics))


def plan_evaluation(args: argparse.Namespace) -> Plan:
    """Check the flags against each other and the checkpoint's config; nothing heavy is loaded.

    Raises:
        CLIError: a flag combination or value that does not fit the flags or the checkpoint.
    """
    metrics = list(dict.fromkeys(args.metrics))  # unique, in the given order
    chosen = set(metrics)
    _check_values(args)
    _check_metric_flags(args, chosen)

    # The checkpoint: its sample shape and conditions, from config.json alone.
    checkpoint = resolve_checkpoint(args.checkpoint)
    config = read_model_config(checkpoint)
    if "in_features" in config:
        sample_shape: tuple[int, ...] = (int(config["in_features"]),)
    else:
        size = int(config["sample_size"])
        sample_shape = (int(config["in_channels"]), size, size)
    needs_samples = bool(chosen & SAMPLE_METRICS)
    if needs_samples and len(sample_shape) != 3:
        raise CLIError(
            f"checkpoint {checkpoint} makes {sample_shape[0]}-d vectors, not images: "
            f"{', '.join(sorted(chosen & SAMPLE_METRICS))} need images (bpd and ood work on vectors)"
        )
    labels = _plan_labels(args, tuple(config.get("condition_sizes") or ()), checkpoint)
    if labels is not None and not needs_samples:
        raise CLIError("class labels are for the sample metrics (fid, kid, isc, accuracy)")

    # The feature extractor and its weights.
    extractor = None
    if needs_samples:
        extractor = args.feature_extractor or (
            "digits" if sample_shape == DIGITS_SHAPE else "inception"
        )
        if extractor == "digits" and sample_shape != DIGITS_SHAPE:
            raise CLIError(
                f"the digits extractor takes 1x8x8 images; checkpoint {checkpoint} makes "
                f"{'x'.join(map(str, sample_shape))}"
            )
    if "accuracy" in chosen and labels is None:
        raise CLIError("--metrics accuracy needs --class_labels or --all_classes")
    if "accuracy" in chosen and extractor != "digits":
        raise CLIError("--metrics accuracy uses the digits classifier (1x8x8 digits models)")
    if args.inception_weights is not None:
        if extractor != "inception" or not chosen & FIDELITY_METRICS:
            raise CLIError(
                "--inception_weights is for fid, kid and isc with the inception extractor"
            )
        if not args.inception_weights.is_file():
            raise CLIError(f"--inception_weights {args.inception_weights} is not a file")
    if args.digits_classifier is not None and extractor != "digits":
        raise CLIError("--digits_classifier is for the digits extractor (1x8x8 digits models)")
    heldout = (args.heldout or args.reference) if chosen & HELDOUT_METRICS else None
    return Plan(checkpoint, metrics, sample_shape, labels, extractor, heldout)


def _check_values(args: argparse.Namespace) -> None:
    """Numbers in range, and an output path that can become a JSON file."""
    for name in (
        "num_samples", "batch_size", "num_examples", "bpd_num_intermediate", "bpd_num_chains"
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name} must be at least 1, got {value}")
    if args.num_langevin_steps is not None and args.num_langevin_steps < 0:
        raise CLIError(f"--num_langevin_steps must be >= 0, got {args.num_langevin_steps}")
    check_upper_bounds(
        args, num_samples=MAX_SAMPLES, batch_size=MAX_SAMPLES, num_examples=MAX_SAMPLES,
        num_langevin_steps=MAX_LANGEVIN_STEPS, bpd_num_intermediate=MAX_LANGEVIN_STEPS,
        bpd_num_chains=MAX_SAMPLES,
    )  # fmt: skip
    if args.bpd_convergence and args.bpd_num_intermediate is not None:
        largest = CONVERGENCE_FACTOR * args.bpd_num_intermediate
        if largest > MAX_LANGEVIN_STEPS:
            raise CLIError(
                f"--bpd_convergence runs {CONVERGENCE_FACTOR} x --bpd_num_intermediate = {largest:,} "
                f"annealing steps, more than {MAX_LANGEVIN_STEPS:,}; give a smaller --bpd_num_intermediate"
            )
    if args.bpd_convergence and args.num_examples == 1:
        raise CLIError(
            "--bpd_convergence needs at least 2 examples (a standard error over examples)"
        )
    check_finite(args, "guidance_scale")
    check_device(args.device)
    if args.guidance_scale < 0:
        raise CLIError(
            f"--guidance_scale must be >= 0 (1 = no guidance), got {args.guidance_scale:g}"
        )
    if args.output.suffix.lower() != ".json":
        raise CLIError(f"--output {args.output} must be a .json file")
    if args.output.is_dir():
        raise CLIError(f"--output {args.output} is a folder; give a .json file path")
    existing = next(parent for parent in args.output.parents if parent.exists())
    if not existing.is_dir():
        raise CLIError(
            f"--output {args.output} cannot be written: {existing} is a file, not a folder"
        )


def _check_metric_flags(args: argparse.Namespace, chosen: set[str]) -> None:
    """Flags that only some metrics use: present when needed, and not given for nothing."""
    paired = sorted(chosen & {"fid", "kid"})
    if paired and args.reference is None:
        raise CLIError(f"--metrics {' '.join(paired)} needs --reference")
    if paired and args.num_samples < 2:
        raise CLIError(f"{' and '.join(paired)} need --num_samples of at least 2")
    if args.reference is not None and not chosen & ({"fid", "kid"} | HELDOUT_METRICS):
        raise CLIError("--reference is used by fid, kid, bpd and ood, none of which was asked for")
    heldout = sorted(chosen & HELDOUT_METRICS)
    if heldout and args.heldout is None and args.reference is None:
        raise CLIError(f"--metrics {' '.join(heldout)} needs --heldout or --reference")
    if args.heldout is not None and not heldout:
        raise CLIError("--heldout is used by bpd and ood, neither of which was asked for")
    if "ood" in chosen and not args.ood:
        raise CLIError("--metrics ood needs --ood with at least one out-of-distribution data set")
    if args.ood and "ood" not in chosen:
        raise CLIError("--ood needs --metrics ood")
    if args.num_examples is not None and not heldout:
        raise CLIError("--num_examples is for bpd and ood")
    for flag in ("bpd_num_intermediate", "bpd_num_chains", "bpd_convergence"):
        if getattr(args, flag) not in (None, False) and "bpd" not in chosen:
            raise CLIError(f"--{flag} is for --metrics bpd")


def _plan_labels(
    args: argparse.Namespace, condition_sizes: tuple[int, ...], checkpoint: Path
) -> list[int] | None:
    """One class label per sample (cycling through the requested classes), or None."""
    classes = requested_classes(
        args.class_labels, args.all_classes, args.guidance_scale, condition_sizes, checkpoint
    )
    if classes is None:
        return None
    return [classes[k % len(classes)] for k in range(args.num_samples)]


# ---------------------------------------------------------------- the command


@dataclass
class Inputs:
    """What the main process loads before sampling: reference data and feature-extractor weights."""

    reference: Reference | None = None
    heldout: Reference | None = None
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
            pipe, plan.labels, [args.seed + k for k in range(args.num_samples)],
            guidance_scale=args.guidance_scale, num_langevin_steps=args.num_langevin_steps,
            batch_size=args.batch_size, state=state,
        )  # fmt: skip
        seconds["sampling"] = time.perf_counter() - start
    if not state.is_main_process:
        return 0  # the main process computes every figure

    start = time.perf_counter()
    if FIDELITY_METRICS & set(plan.metrics):
        results, fidelity_settings = compute_fidelity(
            images, inputs.reference, metrics=FIDELITY_METRICS & set(plan.metrics),
            extractor=EXTRACTORS[plan.extractor], weights_path=inputs.weights,
            batch_size=args.batch_size, cuda=device.type == "cuda",
            cache_root=None if args.no_cache else cache_root() / "fidelity",
        )  # fmt: skip
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
        if "bpd" in plan.metrics:
            _bpd(args, pipe, x_heldout, inputs.heldout, figures, details)
        if "ood" in plan.metrics:
            x_out = {
                spec: ref.data(subset_indices(len(ref), args.num_examples, args.seed))
                for spec, ref in inputs.ood.items()
            }
            details["ood"] = ood_report(pipe, x_heldout, x_out, batch_size=args.batch_size)
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
    heldout: Reference,
    figures: dict[str, Any],
    details: dict[str, Any],
) -> None:
    """Held-out bits/dim into ``figures`` and ``details``; with --bpd_convergence at K and 4K."""
    num_bins = heldout.num_bins if heldout.is_image else None
    steps = args.bpd_num_intermediate or DEFAULT_NUM_INTERMEDIATE
    chains = args.bpd_num_chains or DEFAULT_NUM_CHAINS
    levels = pipe.scheduler.schedule.num_levels
    gradients = (len(x) * (levels - 1) + 16) * chains * steps
    extra = f"; then {CONVERGENCE_FACTOR}x that at K = {CONVERGENCE_FACTOR * steps}"
    print(
        f"bits/dim: {len(x)} examples x {levels - 1} levels x {chains} chains x K = {steps} annealing "
        f"steps (+ the top level): about {gradients:,} energy gradients"
        f"{extra if args.bpd_convergence else ''}",
        file=sys.stderr,
    )
    if not args.bpd_convergence:
        details["bpd"] = heldout_bpd(
            pipe, x, num_bins=num_bins, seed=args.seed, batch_size=args.batch_size,
            num_intermediate=args.bpd_num_intermediate, num_chains=args.bpd_num_chains,
        )  # fmt: skip
        figures["bpd"], figures["nll_nats"] = (
            details["bpd"].pop("bpd"),
            details["bpd"].pop("nll_nats"),
        )
        return
    check = bpd_convergence(
        pipe, x, num_bins=num_bins, seed=args.seed, batch_size=args.batch_size,
        num_intermediate=steps, num_chains=chains, factor=CONVERGENCE_FACTOR,
    )  # fmt: skip
    report = {k: v for k, v in check.reports[1].items() if k not in ("bpd", "nll_nats")}
    details["bpd"] = {**report, **({} if num_bins is None else {"num_bins": num_bins})}
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
