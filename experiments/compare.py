"""CDRL vs DRL vs a diffusion model on 8x8 digits, trained for equal time: sample quality against the number of
network evaluations per sample.

Quality is judged by the independent digits classifier (confident fraction, classes present, largest class
share), torch-fidelity's FID on that classifier's penultimate features against the 1,437 training digits (the
one reference of every digits FID in experiments/results/), and the fraction of near-copies of training
digits. NFE per sample: CDRL T initializer forwards + T*K EBM gradients (N*K for its ``-topN`` rows, which
refine only the N noisiest levels) + 1 when its Tweedie step is on, DRL T*K EBM gradients, DDPM/DDIM one UNet
forward per step.

Usage:
  # time a short run of each method, train the three one at a time for an equal budget, evaluate:
  OMP_NUM_THREADS=1 python experiments/compare.py --train --minutes 8 --runs_dir runs/compare
  # evaluate models trained before (run folders or their exported pipelines):
  OMP_NUM_THREADS=1 python experiments/compare.py --cdrl runs/compare/cdrl --drl runs/compare/drl \
      --diffusion runs/compare/diffusion
Writes <results_dir>/<name>.md (tables and the command), <name>.png (quality against NFE), one sample grid
per sampler (<name>_<sampler>_<steps>.png) and the raw numbers as <runs_dir>/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

# diffusion_baseline sits beside this file (also when a test imports this file by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import diffusion_baseline  # noqa: E402

from cdrl.config import load_config
from cdrl.evaluation.digits import (
    DigitsClassifier,
    digits_split,
    judge_digits,
    load_digits_classifier,
    novelty,
)
from cdrl.evaluation.fidelity import DIGITS_EXTRACTOR, Reference, compute_fidelity
from cdrl.images import save_grid, to_uint8
from cdrl.pipeline import CDRLPipeline
from cdrl.sampling import total_langevin_steps
from cdrl.training.loop import run
from cdrl.utils import git_sha, parse_int_list

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("cdrl", "drl", "diffusion")
# Everything from this heading on in an existing report is kept when the report is rewritten.
NOTES_HEADING = "## Notes"


# ----------------------------------------------------------------------------------------------------------
# The digits FID: torch-fidelity's FID on the registered digits-classifier features (cdrl.evaluation.fidelity).


def digits_fid(
    images: Tensor, reference: Tensor | None = None, classifier_path: str | Path | None = None
) -> float:
    """torch-fidelity's FID between (n, 1, 8, 8) digits in [-1, 1] and real ones, on the penultimate
    features of the digits classifier (the ``digits-classifier`` extractor; ``classifier_path`` its folder,
    default the cached one). The images go through 8-bit values first, as saved samples would.

    The reference is the one every digits FID in experiments/results/ uses: the 1,437 training digits of
    ``digits_split()`` (``reference`` None). Not comparable with Inception FIDs, nor with FIDs against
    another reference (a smaller one biases the estimate upwards).
    """
    if reference is None:
        reference = digits_split()[0]
    figures, _ = compute_fidelity(
        to_uint8(images),
        Reference.from_images("digits-train", to_uint8(reference)),
        metrics={"fid"},
        extractor=DIGITS_EXTRACTOR,
        weights_path=classifier_path,
    )
    return figures["fid"]


def measure(
    images: Tensor,
    classifier: DigitsClassifier,
    train: Tensor,
    test: Tensor,
    classifier_path: str | Path | None = None,
) -> dict[str, Any]:
    """The comparison's quality figures for (n, 1, 8, 8) digits in [-1, 1]; ``classifier_path`` is
    ``classifier``'s folder (None: the cached default), for the FID's feature extractor."""
    judged = judge_digits(images, classifier)
    return {
        "confident_fraction": judged["confident_fraction"],
        "classes_present": judged["classes_present"],
        "max_class_fraction": judged["max_class_fraction"],
        "fid": digits_fid(images, train, classifier_path),
        "copy_fraction": novelty(images, train, reference=test)["copy_fraction"],
    }


# ----------------------------------------------------------------------------------------------------------
# Sampling each kind of model.


def resolve_pipeline(folder: str | Path) -> Path:
    """A run folder's exported ``pipeline`` subfolder, or the folder itself if it is a pipeline."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() and (folder / "pipeline").is_dir():
        folder = folder / "pipeline"
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no exported pipeline (model_index.json) in {folder}")
    return folder


def ebm_nfe(pipeline: CDRLPipeline, n_steps: int, refine_top: int | None = None) -> int:
    """Network evaluations per sample: the initializer's forward at each of the T levels (none for DRL,
    which has no initializer), K Langevin steps at each refined level (all T, or the ``refine_top``
    noisiest; None: the stored setting), + 1 for the Tweedie step when it is on."""
    settings = pipeline.scheduler.langevin_settings(n_steps=n_steps, refine_top=refine_top)
    levels = pipeline.scheduler.schedule.num_levels
    proposals = levels if pipeline.initializer is not None else 0
    return proposals + total_langevin_steps(settings, levels) + int(settings.tweedie)


def trained_levels(pipeline_folder: Path, num_levels: int) -> int:
    """How many of the noisiest levels the exported EBM was trained at (``train.refine_top`` in the
    folder's ``training_config.yaml``; every level when it is absent or null)."""
    path = pipeline_folder / "training_config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    top = ((config or {}).get("train") or {}).get("refine_top")
    return num_levels if top is None else int(top)


def sample_ebm(
    pipeline: CDRLPipeline,
    n_steps: int,
    n: int,
    *,
    seed: int,
    batch_size: int,
    clip_sample: bool = False,
    refine_top: int | None = None,
) -> Tensor:
    """(n, c, h, w) samples in [-1, 1] with K = ``n_steps``; batch i is seeded ``seed + i``.
    ``clip_sample``: clamp the x_0 each proposal mean implies; ``refine_top``: refine only that many of
    the noisiest levels (None: the stored setting); both the pipeline's arguments."""
    chunks = []
    for index, start in enumerate(range(0, n, batch_size)):
        out = pipeline(
            batch_size=min(batch_size, n - start),
            num_langevin_steps=n_steps,
            clip_sample=clip_sample,
            refine_top=refine_top,
            generator=torch.Generator().manual_seed(seed + index),
            output_type="pt",
        )
        chunks.append(torch.as_tensor(out.images).float().cpu() * 2 - 1)
    return torch.cat(chunks)


def sampler_settings(
    folders: dict[str, Path | None],
    *,
    cdrl_steps: Sequence[int],
    drl_steps: Sequence[int],
    ddpm_steps: Sequence[int],
    ddim_steps: Sequence[int],
    seed: int,
    batch_size: int,
    cdrl_refine_top: int | None = None,
) -> list[tuple[str, str, int, int, Callable[[int], Tensor]]]:
    """(method, sampler, steps, nfe, draw(n) -> images) for every setting of every model given."""
    settings = []
    for method, steps_list in (("cdrl", cdrl_steps), ("drl", drl_steps)):
        if folders.get(method) is None:
            continue
        pipe = CDRLPipeline.from_pretrained(str(resolve_pipeline(folders[method])))
        pipe.set_progress_bar_config(disable=True)
        # CDRL at every level (if trained there) and, when it stores (or is given) refine_top, at its
        # refined levels only;
        # each also with its proposals' x0-hat clamped, the counterpart of diffusers' clip_sample.
        levels = pipe.scheduler.schedule.num_levels
        top = (
            pipe.scheduler.config.get("refine_top") if cdrl_refine_top is None else cdrl_refine_top
        )
        tops = [top] if method == "cdrl" and top is not None and top < levels else []
        if trained_levels(resolve_pipeline(folders[method]), levels) == levels:
            tops.insert(
                0, levels
            )  # every level, unless the EBM was trained at the noisiest few only
        clips = (False, True) if pipe.initializer is not None else (False,)
        for refine_top in tops:
            for clip in clips:
                for k in steps_list:

                    def draw_ebm(
                        n: int,
                        k: int = k,
                        pipe: CDRLPipeline = pipe,
                        clip: bool = clip,
                        refine_top: int = refine_top,
                    ) -> Tensor:
                        return sample_ebm(
                            pipe,
                            k,
                            n,
                            seed=seed,
                            batch_size=batch_size,
                            clip_sample=clip,
                            refine_top=refine_top,
                        )

                    name = method.upper() + ("" if refine_top == levels else f"-top{refine_top}")
                    name += "-clip" if clip else ""
                    nfe = ebm_nfe(pipe, k, refine_top)
                    settings.append((method, name, k, nfe, draw_ebm))
    if folders.get("diffusion") is not None:
        unet, train_scheduler = diffusion_baseline.load_diffusion(folders["diffusion"])
        # With diffusers' default clip_sample (x0-hat clamped to [-1, 1] at every step) and without it:
        # the unclipped rows are like-for-like with CDRL's unclipped ones, the clipped with CDRL-clip.
        for clip in (True, False):
            for sampler, steps_list in (("ddpm", ddpm_steps), ("ddim", ddim_steps)):
                for k in steps_list:

                    def draw(
                        n: int, k: int = k, sampler: str = sampler, clip: bool = clip
                    ) -> Tensor:
                        return diffusion_baseline.sample_diffusion(
                            unet,
                            sampler,
                            k,
                            n,
                            torch.Generator().manual_seed(seed),
                            train_scheduler=train_scheduler,
                            batch_size=batch_size,
                            clip_sample=clip,
                        )

                    name = sampler.upper() + ("-clip" if clip else "")
                    settings.append(("diffusion", name, k, k, draw))
    return settings


def evaluate(
    folders: dict[str, Path | None],
    *,
    classifier: DigitsClassifier,
    classifier_path: str | Path | None = None,
    cdrl_steps: Sequence[int] = (3, 5, 8, 15),
    drl_steps: Sequence[int] = (15, 30),
    ddpm_steps: Sequence[int] = (10, 20, 50, 100, 1000),
    ddim_steps: Sequence[int] = (5, 10, 20, 50, 100),
    num_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 500,
    grid_prefix: Path | None = None,
    cdrl_refine_top: int | None = None,
) -> dict[str, Any]:
    """Sample every model at every setting and measure the samples.

    Args:
        folders: {"cdrl" | "drl" | "diffusion": run or pipeline folder, or None to skip}.
        classifier: the digits classifier that judges the samples.
        classifier_path: its folder (None: the cached default), for the FID's feature extractor.
        cdrl_steps, drl_steps: K per level for the EBMs; ddpm_steps, ddim_steps: sampling steps.
        num_samples: samples per setting.
        seed: sampling seed (the same for every setting).
        batch_size: samples per sampler call.
        grid_prefix: save the first 100 samples of each sampler's last setting as <prefix>_<sampler>_<steps>.png.
        cdrl_refine_top: CDRL's refined levels for its ``-topN`` rows (None: the exported setting).

    Returns:
        {"rows": one dict per setting (method, sampler, steps, nfe, the ``measure`` figures, sampling
        seconds), "reference": the same figures for the real test digits, "grids": the saved PNGs}.
    """
    x_train, _, x_test, _ = digits_split()
    settings = sampler_settings(
        folders,
        cdrl_steps=cdrl_steps,
        drl_steps=drl_steps,
        ddpm_steps=ddpm_steps,
        ddim_steps=ddim_steps,
        seed=seed,
        batch_size=batch_size,
        cdrl_refine_top=cdrl_refine_top,
    )
    last = {sampler: steps for _, sampler, steps, _, _ in settings}
    rows, grids = [], []
    for method, sampler, steps, nfe, draw in settings:
        wall, cpu = time.perf_counter(), time.process_time()
        images = draw(num_samples)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        row = {
            "method": method,
            "sampler": sampler,
            "steps": steps,
            "nfe": nfe,
            **measure(images, classifier, x_train, x_test, classifier_path),
            "sampling_wall_s": round(wall, 2),
            "sampling_cpu_s": round(cpu, 2),
        }
        rows.append(row)
        print(format_row(row), flush=True)
        if grid_prefix is not None and steps == last[sampler]:
            path = Path(f"{grid_prefix}_{sampler.lower()}_{steps}.png")
            save_grid(images[:100], path, nrow=10, upscale=4)
            grids.append(str(path))
    # The floor: real digits the models never saw (the 360 test digits) against the same reference.
    reference = measure(x_test, classifier, x_train, x_test, classifier_path)
    reference["copy_fraction"] = None  # the copy threshold is defined by these digits
    return {"rows": rows, "reference": reference, "grids": grids}


# ----------------------------------------------------------------------------------------------------------
# Equal-time training.


def ebm_train_fn(config: Path, extra: Sequence[str] = ()) -> Callable[[Path, int], dict[str, Any]]:
    """train(folder, steps) for a cdrl config: ``cdrl.training.loop.run`` with train.max_steps = steps."""

    def train(folder: Path, steps: int, *, quiet: bool = False) -> dict[str, Any]:
        overrides = [f"train.max_steps={steps}", f"log.output_dir={folder}", *extra]
        if quiet:  # a timing run: no grids, checkpoints or trackers inside the loop
            overrides += [
                "log.sample_every=0",
                "log.checkpointing_steps=0",
                "log.report_to=none",
                "log.num_grid_samples=1",
                f"log.log_every={steps}",
            ]
        cfg = load_config(config, overrides)
        resume = "latest" if (folder / "config.yaml").is_file() else None
        run(cfg, resume=resume)
        return {"steps": steps, "config": str(config), "overrides": overrides}

    return train


def diffusion_train_fn(**kwargs: Any) -> Callable[[Path, int], dict[str, Any]]:
    """train(folder, steps) for the diffusion baseline."""

    def train(folder: Path, steps: int, *, quiet: bool = False) -> dict[str, Any]:
        summary = diffusion_baseline.train_diffusion(folder, max_steps=steps, **kwargs)
        return {k: v for k, v in summary.items() if k != "settings"}

    return train


def cpu_seconds_per_step(train: Callable, short: int, long: int) -> float:
    """CPU seconds per training step: the difference of two fresh runs of ``short`` and ``long`` steps.

    Setup and export cost the same in both and cancel. CPU time rather than wall time, so that other jobs on
    a shared machine do not change the figure (much): at one thread it is the time the step takes alone.
    """
    costs = []
    for steps in (short, long):
        with tempfile.TemporaryDirectory(prefix="cdrl-compare-timing-") as tmp:
            start = time.process_time()
            train(Path(tmp) / "run", steps, quiet=True)
            costs.append(time.process_time() - start)
    return max(costs[1] - costs[0], 1e-9) / (long - short)


def train_all(
    runs_dir: Path,
    *,
    minutes: float,
    trainers: dict[str, Callable],
    timing_steps: dict[str, tuple[int, int]],
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """Time each method, then train each for ``minutes`` of single-process CPU time, one after another.

    The budget in steps is minutes * 60 / (CPU seconds per step), measured by ``cpu_seconds_per_step`` and
    cached in ``runs_dir/timing.json``. A method whose ``runs_dir/<method>/pipeline`` exists is not trained
    again; one interrupted mid-run resumes from its last checkpoint.

    Returns:
        {method: {"cpu_s_per_step", "budget_steps", "train_wall_s", "train_cpu_s", ...}}.
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    timing_path = runs_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    for method, train in trainers.items():
        if method in skip:
            continue
        entry = timing.setdefault(method, {})
        if "cpu_s_per_step" not in entry:
            short, long = timing_steps[method]
            print(f"timing {method}: {short} and {long} steps", flush=True)
            entry.update(
                {
                    "cpu_s_per_step": cpu_seconds_per_step(train, short, long),
                    "timing_steps": [short, long],
                    "num_threads": torch.get_num_threads(),
                }
            )
            timing_path.write_text(json.dumps(timing, indent=2))
        entry["minutes"] = minutes
        entry["budget_steps"] = max(1, round(minutes * 60 / entry["cpu_s_per_step"]))
        print(
            f"{method}: {entry['cpu_s_per_step']:.4f} CPU s/step -> {entry['budget_steps']} steps in "
            f"{minutes:g} min",
            flush=True,
        )
    for method, train in trainers.items():
        folder = runs_dir / method
        if method in skip or (folder / "pipeline" / "model_index.json").is_file():
            continue
        print(f"training {method} for {timing[method]['budget_steps']} steps", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        info = train(folder, timing[method]["budget_steps"])
        timing[method].update(
            {
                "train_wall_s": round(time.perf_counter() - wall, 1),
                "train_cpu_s": round(time.process_time() - cpu, 1),
                "train": info,
                "git_sha": git_sha(),
            }
        )
        timing_path.write_text(json.dumps(timing, indent=2))
    return timing


def parameter_counts(folders: dict[str, Path | None]) -> dict[str, int]:
    """Trainable parameters per method (EBM + initializer; UNet)."""
    counts = {}
    for method in ("cdrl", "drl"):
        if folders.get(method) is not None:
            pipe = CDRLPipeline.from_pretrained(str(resolve_pipeline(folders[method])))
            modules = [m for m in (pipe.ebm, pipe.initializer) if m is not None]
            counts[method] = sum(p.numel() for m in modules for p in m.parameters())
    if folders.get("diffusion") is not None:
        unet, _ = diffusion_baseline.load_diffusion(folders["diffusion"])
        counts["diffusion"] = diffusion_baseline.num_parameters(unet)
    return counts


# ----------------------------------------------------------------------------------------------------------
# Report: table, plot.


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['sampler']:<5} steps {row['steps']:>4} NFE {row['nfe']:>4}  confident "
        f"{row['confident_fraction']:.3f}  classes {row['classes_present']:>2}  largest "
        f"{row['max_class_fraction']:.3f}  FID {row['fid']:.2f}  copies {row['copy_fraction']:.3f}  "
        f"{row['sampling_cpu_s']:.1f} CPU s"
    )


def markdown_table(result: dict[str, Any]) -> str:
    """The results table: one line per sampler setting, then the real test digits."""
    lines = [
        "| model | sampler | K or steps | NFE / sample | confident (p >= 0.9) | classes | largest class "
        "| digits FID | copies | sampling CPU s / 1000 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        per_1000 = row["sampling_cpu_s"] * 1000 / result["num_samples"]
        lines.append(
            f"| {row['method']} | {row['sampler']} | {row['steps']} | {row['nfe']} "
            f"| {_fmt(row['confident_fraction'])} | {row['classes_present']} "
            f"| {_fmt(row['max_class_fraction'])} | {_fmt(row['fid'], 2)} "
            f"| {_fmt(row['copy_fraction'])} | {per_1000:.1f} |"
        )
    ref = result["reference"]
    lines.append(
        f"| real test digits | - | - | - | {_fmt(ref['confident_fraction'])} | {ref['classes_present']} "
        f"| {_fmt(ref['max_class_fraction'])} | {_fmt(ref['fid'], 2)} | - | - |"
    )
    return "\n".join(lines)


def training_table(timing: dict[str, Any], params: dict[str, int], folders: dict[str, Any]) -> str:
    lines = [
        "| model | parameters | CPU s / step (1 thread) | steps | training wall s | training CPU s | folder |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        if folders.get(method) is None:
            continue
        entry = timing.get(method, {})
        count = f"{params[method]:,}" if method in params else "-"
        lines.append(
            f"| {method} | {count} | {_fmt(entry.get('cpu_s_per_step'), 4)} "
            f"| {entry.get('budget_steps', '-')} | {_fmt(entry.get('train_wall_s'), 0)} "
            f"| {_fmt(entry.get('train_cpu_s'), 0)} | `{folders[method]}` |"
        )
    return "\n".join(lines)


def write_report(
    path: Path,
    result: dict[str, Any],
    *,
    command: str,
    timing: dict[str, Any],
    params: dict[str, int],
    folders: dict[str, Any],
    plot_path: Path | None,
) -> None:
    """<name>.md: command, training budget, results table; a ``## Notes`` section already there is kept."""
    notes = ""
    if path.is_file():
        text = path.read_text()
        if NOTES_HEADING in text:
            notes = text[text.index(NOTES_HEADING) :]
    parts = [
        "# CDRL vs DRL vs diffusion on 8x8 digits at equal training time\n",
        f"Command (git `{git_sha()}`):\n\n```bash\n{command}\n```\n",
        "## Training\n",
        training_table(timing, params, folders) + "\n",
        f"## Quality against network evaluations ({result['num_samples']} samples per row, seed "
        f"{result['seed']})\n",
        markdown_table(result) + "\n",
        "NFE: CDRL T initializer forwards + T*K EBM gradients (`CDRL-topN`: N*K, Langevin at the N "
        "noisiest levels only) + 1 when its Tweedie step is on; "
        "DRL T*K EBM gradients; DDPM/DDIM one UNet forward per step. `confident`: fraction the independent "
        "digits classifier labels with p >= 0.9; `classes`: classes with at least one confident sample; "
        "`largest class`: share of the most frequent predicted class; `digits FID`: torch-fidelity's FID on "
        "the classifier's penultimate features (the registered `digits-classifier` extractor) against the "
        "1,437 training digits (the one reference of every digits FID in experiments/results/); `-clip`: "
        "diffusers' default `clip_sample` (x0-hat clamped to [-1, 1] every step), `CDRL-clip` the same for the x0-hat each CDRL proposal mean implies (`clip_sample`, off by default); `copies`: share of samples nearer to a training digit than 99% of real "
        "test digits are.\n",
    ]
    if plot_path is not None:
        parts.append(f"![quality against NFE]({plot_path.name})\n")
    if result["grids"]:
        parts.append(
            "Sample grids: " + ", ".join(f"`{Path(g).name}`" for g in result["grids"]) + "\n"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + ("\n" + notes if notes else ""))


def plot(result: dict[str, Any], path: Path) -> Path:
    """Confident fraction and digits FID against NFE (log scale), one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    samplers = dict.fromkeys(row["sampler"] for row in result["rows"])
    for sampler in samplers:
        rows = sorted(
            (r for r in result["rows"] if r["sampler"] == sampler), key=lambda r: r["nfe"]
        )
        nfe = [r["nfe"] for r in rows]
        for ax, key in zip(axes, ("confident_fraction", "fid"), strict=True):
            ax.plot(nfe, [r[key] for r in rows], marker="o", label=sampler)
    ref = result["reference"]
    for ax, key, title in zip(
        axes,
        ("confident_fraction", "fid"),
        (
            "confident fraction (p >= 0.9), higher is better",
            "digits FID (classifier features), lower is better",
        ),
        strict=True,
    ):
        ax.axhline(ref[key], color="gray", linestyle="--", label="real test digits")
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for method in METHODS:
        parser.add_argument(
            f"--{method}", type=Path, default=None, help=f"trained {method} run or pipeline"
        )
    parser.add_argument(
        "--train",
        action="store_true",
        help="train the methods not given above into --runs_dir, equal --minutes each",
    )
    parser.add_argument(
        "--minutes", type=float, default=8.0, help="training budget per method (CPU time)"
    )
    parser.add_argument("--runs_dir", type=Path, default=Path("runs/compare"))
    parser.add_argument("--cdrl_config", type=Path, default=ROOT / "configs/digits.yaml")
    parser.add_argument("--drl_config", type=Path, default=ROOT / "configs/digits_drl.yaml")
    parser.add_argument("--diffusion_batch_size", type=int, default=32)
    parser.add_argument("--diffusion_lr", type=float, default=1e-3)
    parser.add_argument(
        "--timing_steps",
        type=int,
        default=100,
        help="EBM timing: runs of 20 and 20 + this many steps",
    )
    parser.add_argument("--diffusion_timing_steps", type=int, default=500)
    parser.add_argument("--cdrl_steps", default="3,5,8,15", help="K values for CDRL")
    parser.add_argument(
        "--cdrl_refine_top",
        type=int,
        default=None,
        help="CDRL's -topN rows refine this many of the noisiest levels (default: the exported refine_top)",
    )
    parser.add_argument("--drl_steps", default="15,30", help="K values for DRL")
    parser.add_argument("--ddpm_steps", default="10,20,50,100,1000")
    parser.add_argument("--ddim_steps", default="5,10,20,50,100")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=500, help="samples per sampler call")
    parser.add_argument("--classifier", type=Path, default=None, help="digits classifier folder")
    parser.add_argument("--results_dir", type=Path, default=ROOT / "experiments/results")
    parser.add_argument("--name", default="compare", help="file name stem of the outputs")
    parser.add_argument("--no_plot", action="store_true")
    args = parser.parse_args(argv)
    if args.num_samples < 2 or args.batch_size < 1:
        parser.error("--num_samples must be >= 2 and --batch_size >= 1")

    folders: dict[str, Path | None] = {m: getattr(args, m) for m in METHODS}
    timing: dict[str, Any] = {}
    if args.train:
        trainers = {
            "cdrl": ebm_train_fn(args.cdrl_config),
            "drl": ebm_train_fn(args.drl_config),
            "diffusion": diffusion_train_fn(
                batch_size=args.diffusion_batch_size, learning_rate=args.diffusion_lr
            ),
        }
        n = args.timing_steps
        timing_steps = {
            "cdrl": (20, 20 + n),
            "drl": (20, 20 + n),
            "diffusion": (100, 100 + args.diffusion_timing_steps),
        }
        given = [m for m in METHODS if folders[m] is not None]
        timing = train_all(
            args.runs_dir,
            minutes=args.minutes,
            trainers=trainers,
            timing_steps=timing_steps,
            skip=given,
        )
        for method in METHODS:
            folders[method] = folders[method] or args.runs_dir / method
    elif (args.runs_dir / "timing.json").is_file():
        timing = json.loads((args.runs_dir / "timing.json").read_text())
    if not any(folders.values()):
        parser.error("give --cdrl/--drl/--diffusion folders, or --train")

    classifier = load_digits_classifier(args.classifier)
    steps = {
        key: parse_int_list(getattr(args, key))
        for key in ("cdrl_steps", "drl_steps", "ddpm_steps", "ddim_steps")
    }
    result = evaluate(
        folders,
        classifier=classifier,
        classifier_path=args.classifier,
        num_samples=args.num_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        grid_prefix=args.results_dir / args.name,
        cdrl_refine_top=args.cdrl_refine_top,
        **steps,
    )
    result.update(
        {
            "num_samples": args.num_samples,
            "seed": args.seed,
            "timing": timing,
            "folders": {k: None if v is None else str(v) for k, v in folders.items()},
            "git_sha": git_sha(),
        }
    )
    plot_path = None if args.no_plot else plot(result, args.results_dir / f"{args.name}.png")
    argv_text = shlex.join(sys.argv[1:] if argv is None else list(argv))
    command = f"OMP_NUM_THREADS={torch.get_num_threads()} python experiments/compare.py {argv_text}"
    write_report(
        args.results_dir / f"{args.name}.md",
        result,
        command=command,
        timing=timing,
        params=parameter_counts(folders),
        folders=folders,
        plot_path=plot_path,
    )
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    (args.runs_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.results_dir / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
