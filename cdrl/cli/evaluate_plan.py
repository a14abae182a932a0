"""``cdrl-evaluate``'s flags and the plan they make: which metrics, on which data, checked before any
work (``cdrl.cli.evaluate`` runs the plan)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from cdrl.checks import MAX_LANGEVIN_STEPS, MAX_SAMPLES, check_device
from cdrl.cli.common import (
    ArgumentParser,
    CLIError,
    check_finite,
    check_upper_bounds,
    requested_classes,
)
from cdrl.config import ConfigError, load_config
from cdrl.evaluation.bpd import (
    CONVERGENCE_TOLERANCE,
    DEFAULT_NUM_CHAINS,
    DEFAULT_NUM_INTERMEDIATE,
    sampler_gaussian_levels,
)
from cdrl.evaluation.fidelity import (
    DIGITS_SHAPE,
    EXTRACTORS,
    reference_choices,
    training_split,
)
from cdrl.export import TRAINING_CONFIG, read_model_config, resolve_checkpoint

DEFAULT_NUM_SAMPLES = 50_000  # as the papers report FID / IS
METRICS = ("fid", "kid", "isc", "accuracy", "bpd", "ood")
DEFAULT_METRICS = ("fid", "kid", "isc")
FIDELITY_METRICS = {"fid", "kid", "isc"}
SAMPLE_METRICS = FIDELITY_METRICS | {"accuracy"}  # metrics of generated samples
HELDOUT_METRICS = {"bpd", "ood"}  # metrics of held-out real data under the model
SCHEMA = "cdrl-evaluate/1"

DESCRIPTION = "cdrl-evaluate: sample quality (FID, KID, IS), conditional accuracy, held-out bits/dim, OOD AUROC."
CONVERGENCE_FACTOR = 4  # --bpd_convergence: the estimate at K and at 4K annealing steps
# The default bpd of the 360 digits test images, 12 levels: 2:52 measured on 1 thread.
DIGITS_MINUTES = 3
# at most this many training examples fit the Gaussian levels' variances
GAUSSIAN_FIT_EXAMPLES = 2_048


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (usage errors are one-line CLIErrors)."""
    parser = ArgumentParser(prog="cdrl-evaluate", description=DESCRIPTION)
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a pipeline folder (model_index.json), or a run folder holding one in pipeline/",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        default=list(DEFAULT_METRICS),
        metavar="M",
        help="any of fid kid isc (torch-fidelity), accuracy (conditional digits: the classifier reads "
        "the requested class), bpd (held-out bits/dim), ood (OOD AUROC); default: fid kid isc",
    )
    parser.add_argument(
        "--num_samples",
        type=int,
        default=DEFAULT_NUM_SAMPLES,
        metavar="N",
        help=f"generated samples (default {DEFAULT_NUM_SAMPLES:,}, as the papers use)",
    )
    parser.add_argument(
        "--reference",
        metavar="R",
        help="real data for fid / kid (and, without --heldout, for bpd / ood): a registered data set "
        f"({reference_choices()}), a folder of images, or a config file configs/NAME.yaml[:train|:test]",
    )
    parser.add_argument(
        "--heldout",
        metavar="R",
        help="held-out real data for bpd, and the in-distribution data for ood (default: --reference)",
    )
    parser.add_argument(
        "--ood", nargs="+", default=[], metavar="R", help="out-of-distribution data sets for ood"
    )
    parser.add_argument(
        "--ood_score",
        choices=("energy", "nll"),
        default="energy",
        help="ood: score each example by the lowest level's energy (energy, the default) or by the density "
        "bound's negative log-likelihood, computed as --metrics bpd computes it, with its --bpd_* settings "
        "and the held-out data's grey levels for every set (nll; energy is refused for a model whose "
        "level-0 EBM was never trained, such as a train.refine_top recipe)",
    )
    parser.add_argument(
        "--num_examples",
        type=int,
        default=None,
        metavar="N",
        help="bpd / ood: at most N examples of each data set (a seeded random subset; default all)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--class_labels",
        type=int,
        nargs="+",
        metavar="C",
        help="class-conditional models: sample k gets label C[k mod len(C)] (default: unconditional)",
    )
    which.add_argument(
        "--all_classes", action="store_true", help="cycle through every class 0..n-1"
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        metavar="S",
        help="classifier-free guidance, diffusers' meaning: 1 = off, > 1 stronger (w = S - 1)",
    )
    parser.add_argument(
        "--num_langevin_steps",
        type=int,
        default=None,
        metavar="K",
        help="Langevin steps per noise level (default: the trained value)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sample k uses seed + k (default 0)")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=256,
        help="samples per forward, in sampling and in feature extraction (default 256)",
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="the JSON file of figures, settings, versions"
    )
    parser.add_argument(
        "--feature_extractor",
        choices=sorted(EXTRACTORS),
        default=None,
        help="inception (torch-fidelity's standard InceptionV3) or digits (the offline 8x8 digits "
        "classifier); default: digits for 1x8x8 models, inception otherwise",
    )
    parser.add_argument(
        "--inception_weights",
        type=Path,
        metavar="PATH",
        help="a local copy of torch-fidelity's InceptionV3 weights (default: download on first use)",
    )
    parser.add_argument(
        "--digits_classifier",
        type=Path,
        metavar="PATH",
        help="the digits classifier folder (default $CDRL_CACHE_DIR/digits_classifier, trained on "
        "first use; retrain with python -m cdrl.evaluation.digits --output PATH)",
    )
    parser.add_argument(
        "--data_dir",
        type=Path,
        metavar="DIR",
        help="root of local copies of torch-fidelity's registered data sets (cifar10-train, ...)",
    )
    parser.add_argument(
        "--no_cache",
        action="store_true",
        help="do not cache reference features and statistics (cached under $CDRL_CACHE_DIR/fidelity)",
    )
    parser.add_argument(
        "--bpd_num_intermediate",
        type=int,
        default=None,
        metavar="K",
        help=f"bpd: annealing steps per level (default {DEFAULT_NUM_INTERMEDIATE}). The cost is about "
        "examples x (levels - 1) x chains x K energy gradients, plus 16 x chains x K for the top level: "
        f"at the defaults, the 360 digits test images through a 12-level model take ~{DIGITS_MINUTES} "
        "min on 2 CPU cores; it grows in proportion to each factor",
    )
    parser.add_argument(
        "--bpd_num_chains",
        type=int,
        default=None,
        metavar="M",
        help=f"bpd: AIS chains per example and level (default {DEFAULT_NUM_CHAINS})",
    )
    parser.add_argument(
        "--bpd_convergence",
        action="store_true",
        help=f"bpd: estimate at K and at {CONVERGENCE_FACTOR}K annealing steps (same examples and "
        "dequantization, independent AIS seeds) and report both with their standard errors, the "
        f"relative change and whether it converged (moved by < {CONVERGENCE_TOLERANCE * 100:g}%% and agrees "
        f"within the standard errors); the {CONVERGENCE_FACTOR}K run costs {CONVERGENCE_FACTOR}x the "
        f"K run, {CONVERGENCE_FACTOR + 1}x a plain bpd in all; the reported bpd is the "
        f"{CONVERGENCE_FACTOR}K figure",
    )
    parser.add_argument(
        "--bpd_gaussian_levels",
        default=None,
        metavar="L",
        help="bpd: score the lowest L levels as the initializer's exact Gaussians N(m_t(x_{t+1}), v_t I) "
        "(no AIS there) and the levels above by the EBM, its normalizers by AIS. all (the default): every "
        "level below the top, whose marginal EBM stays (T - 1; 0 without an initializer); sampler: the chain "
        "the model samples, T - refine_top for a model that refines only its refine_top noisiest levels, "
        "else 0; 0: every level the EBM's (DRL's density)",
    )
    parser.add_argument(
        "--bpd_gaussian_variances",
        type=float,
        nargs="+",
        default=None,
        metavar="V",
        help="bpd: v_0 .. v_{L-1} of the Gaussian levels, in the model's units squared (default: their "
        f"maximum-likelihood values on up to {GAUSSIAN_FIT_EXAMPLES:,} examples of the training split of "
        "the held-out data, e.g. digits-train for digits-test)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (default: the process's accelerate device: cuda if available)",
    )
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
    gaussian_levels: int = 0  # bpd: the lowest levels scored as the initializer's Gaussians
    gaussian_fit: str | None = None  # the data that fit their variances (bpd)

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
    if "ood" in chosen and args.ood_score == "energy":
        _check_level0_trained(checkpoint)
    gaussian_levels, gaussian_fit = _plan_gaussian_levels(args, checkpoint, heldout, chosen)
    return Plan(
        checkpoint, metrics, sample_shape, labels, extractor, heldout, gaussian_levels, gaussian_fit
    )


def _check_level0_trained(checkpoint: Path) -> None:
    """CLIError when the run's training config (``training_config.yaml``, when the folder has one) says
    the EBM never learned at level 0 (``train.refine_top`` below the number of levels): its energy, the
    default OOD score, would be an untrained network's."""
    path = checkpoint / TRAINING_CONFIG
    if not path.is_file():
        return
    try:
        cfg = load_config(path, [])
    except (ConfigError, OSError):
        return  # not ours to judge here; the score then reads the EBM as it is
    top, levels = cfg.train.refine_top, cfg.schedule.num_levels
    if top is not None and top < levels:
        raise CLIError(
            f"--ood_score energy reads the level-0 EBM, which this model never trained (train.refine_top: "
            f"{top} of {levels} levels); use --ood_score nll"
        )


def _plan_gaussian_levels(
    args: argparse.Namespace, checkpoint: Path, heldout: str | None, chosen: set[str]
) -> tuple[int, str | None]:
    """L of --bpd_gaussian_levels (all, sampler or a number) and the data that fit the variances."""
    if "bpd" not in chosen and not ("ood" in chosen and args.ood_score == "nll"):
        return 0, None
    path = checkpoint / "scheduler" / "scheduler_config.json"
    try:
        scheduler = json.loads(path.read_text())
        num_levels = int(scheduler["num_levels"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CLIError(
            f"checkpoint {checkpoint} is incomplete: {path} is missing or unreadable"
        ) from None
    has_initializer = (checkpoint / "initializer").is_dir()
    given = args.bpd_gaussian_levels
    if given in (None, "all"):
        levels = num_levels - 1 if has_initializer else 0
    elif given == "sampler":
        levels = sampler_gaussian_levels(num_levels, scheduler.get("refine_top"), has_initializer)
    else:
        try:
            levels = int(given)
        except ValueError:
            raise CLIError(
                f"--bpd_gaussian_levels must be an integer, all or sampler, got {given!r}"
            ) from None
        if not 0 <= levels < num_levels:
            raise CLIError(
                f"--bpd_gaussian_levels must be in [0, {num_levels - 1}] for this {num_levels}-level "
                f"model (the top level is the EBM's), got {levels}"
            )
        if levels and not has_initializer:
            raise CLIError(
                f"--bpd_gaussian_levels {levels} needs an initializer (its means are the Gaussians'); "
                f"checkpoint {checkpoint} has none"
            )
    variances = args.bpd_gaussian_variances
    if variances is not None and len(variances) != levels:
        raise CLIError(
            f"--bpd_gaussian_variances gives {len(variances)} values for {levels} Gaussian levels; "
            "give one per level, lowest first"
        )
    if levels == 0 or variances is not None:
        return levels, None
    fit = training_split(heldout)
    if fit is None:
        raise CLIError(
            f"the {levels} Gaussian levels fit their variances on the training split of the held-out "
            f"data, and {heldout} has none; give --bpd_gaussian_variances or --bpd_gaussian_levels 0"
        )
    return levels, fit


def _check_values(args: argparse.Namespace) -> None:
    """Numbers in range, and an output path that can become a JSON file."""
    for name in (
        "num_samples",
        "batch_size",
        "num_examples",
        "bpd_num_intermediate",
        "bpd_num_chains",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name} must be at least 1, got {value}")
    if args.num_langevin_steps is not None and args.num_langevin_steps < 0:
        raise CLIError(f"--num_langevin_steps must be >= 0, got {args.num_langevin_steps}")
    check_upper_bounds(
        args,
        num_samples=MAX_SAMPLES,
        batch_size=MAX_SAMPLES,
        num_examples=MAX_SAMPLES,
        num_langevin_steps=MAX_LANGEVIN_STEPS,
        bpd_num_intermediate=MAX_LANGEVIN_STEPS,
        bpd_num_chains=MAX_SAMPLES,
    )
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
    for v in args.bpd_gaussian_variances or ():
        if not math.isfinite(v) or v <= 0:
            raise CLIError(f"--bpd_gaussian_variances must be finite and > 0, got {v:g}")
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
    nll = "ood" in chosen and args.ood_score == "nll"  # the NLL score uses the bpd settings
    for flag in (
        "bpd_num_intermediate",
        "bpd_num_chains",
        "bpd_convergence",
        "bpd_gaussian_levels",
        "bpd_gaussian_variances",
    ):
        if getattr(args, flag) not in (None, False) and "bpd" not in chosen and not nll:
            raise CLIError(f"--{flag} is for --metrics bpd (or ood with --ood_score nll)")
    if args.ood_score != "energy" and "ood" not in chosen:
        raise CLIError("--ood_score is for --metrics ood")


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
