"""``cdrl-inpaint``: complete the masked part of images with a trained model.

Mask convention (diffusers): 1 / white = repaint, 0 / black = keep. Writes a new output folder, all
or nothing: per input a side-by-side PNG (input, mask, masked input, completions), the completions
at the model's resolution, and ``manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cdrl.checks import MAX_RESAMPLE, MAX_SAMPLES, check_device
from cdrl.cli.common import (
    ArgumentParser,
    CLIError,
    check_finite,
    check_upper_bounds,
    run_cli,
)
from cdrl.export import load_pipeline
from cdrl.generation import (
    MASK_CONVENTION,
    MASK_PRESETS,
    complete,
    panel,
    preset_mask,
    to_pil,
    unit_to_uint8,
)
from cdrl.images import GREY_MODES, grey_array, image_array, is_grey_palette
from cdrl.utils import atomic_write, check_output_folder, check_writable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MANIFEST = "manifest.json"
MAX_GREY_FRACTION = 0.10  # a mask is binary-like if at most this share of pixels is in (0.1, 0.9)


def collect_images(paths: Sequence[str | Path], *, what: str = "image") -> list[Path]:
    """Files as given, and the PNG / JPEG files of folders (sorted, hidden files skipped).

    Raises:
        CLIError: a path that does not exist, or a folder with no PNG or JPEG file.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.is_file()
                and not p.name.startswith(".")
                and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise CLIError(f"{what} folder {path} holds no PNG or JPEG files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CLIError(f"{what} {path} does not exist")
    return files


def read_image(path: str | Path, channels: int) -> tuple[np.ndarray, bool]:
    """An image file as (channels, h, w) float32 in [0, 1].

    Args:
        path: a PNG or JPEG file (anything Pillow reads is accepted).
        channels: 1 (greyscale) or 3 (RGB), the model's.

    Returns:
        The array, and whether colour was dropped (a colour image read as greyscale).

    Raises:
        CLIError: the file cannot be read.
    """
    return image_array(_open(path, "image"), channels)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as (h, w) float32 of 0 / 1 (1 / white = repaint, 0 / black = keep).

    The file must be single-channel (greyscale or 1-bit; a palette of greys is accepted) and
    binary-like: at most 10% of its pixels strictly between 0.1 and 0.9 (JPEG edges); it is
    thresholded at 0.5.

    Raises:
        CLIError: the file cannot be read, has several channels, or is not binary-like.
    """
    image = _open(path, "mask")
    if image.mode in GREY_MODES:
        values = grey_array(image)
    elif image.mode == "P" and is_grey_palette(image):
        values = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    else:
        bands = len(image.getbands()) if image.mode != "P" else "colour palette"
        raise CLIError(
            f"mask {path} is not single-channel ({image.mode}, {bands} channels); save it as a "
            f"greyscale image ({MASK_CONVENTION})"
        )
    grey = float(((values > 0.1) & (values < 0.9)).mean())
    if grey > MAX_GREY_FRACTION:
        raise CLIError(
            f"mask {path} is not binary: {grey:.0%} of its pixels are grey (strictly between 0.1 "
            f"and 0.9, at most {MAX_GREY_FRACTION:.0%} allowed); use only black and white "
            f"({MASK_CONVENTION})"
        )
    return (values >= 0.5).astype(np.float32)


def _open(path: str | Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CLIError(f"cannot read {what} {path}: {reason}") from None


def resize(array: np.ndarray, size: int, *, binary: bool = False) -> np.ndarray:
    """Resize (c, h, w) in [0, 1] to (c, size, size): antialiased bicubic (or bilinear, rounded)."""
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    mode = "bilinear" if binary else "bicubic"
    x = F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False)[0]
    x = (x >= 0.5).float() if binary else x.clamp(0.0, 1.0)
    return x.numpy()


# ------------------------------------------------------------------------------------------------
# The command line.


@dataclass
class _Input:
    path: Path
    mask_source: str  # the mask file, or "preset:<name>"
    known: np.ndarray  # (c, s, s) in [0, 1], at the model's resolution
    repaint: np.ndarray  # (s, s) 0 / 1, 1 = repaint
    original_size: tuple[int, int]  # (width, height) of the file


def build_parser() -> argparse.ArgumentParser:
    """The ``cdrl-inpaint`` argument parser (usage errors are one-line CLIErrors)."""
    parser = ArgumentParser(
        prog="cdrl-inpaint",
        description=(
            f"Complete the masked part of images with a trained CDRL model ({MASK_CONVENTION}). "
            "Known pixels are kept exactly; the masked ones are sampled."
        ),
        epilog=(
            f"Mask convention (diffusers): {MASK_CONVENTION}. Writes OUTPUT/<index>_<name>.png "
            "(input | mask, white = repaint | masked input | completions), "
            "OUTPUT/completions/*.png at the model's resolution and OUTPUT/manifest.json."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="exported pipeline folder, or a run folder with pipeline/",
    )
    parser.add_argument(
        "--image",
        nargs="+",
        required=True,
        metavar="PATH",
        help="PNG or JPEG files, or folders of them; converted to the model's channels and "
        f"resolution ({MASK_CONVENTION} applies to the masks)",
    )
    masks = parser.add_mutually_exclusive_group(required=True)
    masks.add_argument(
        "--mask",
        nargs="+",
        metavar="PATH",
        help="single-channel mask files, or a folder of them: one for all images or one per "
        f"image, the same size as its image ({MASK_CONVENTION})",
    )
    masks.add_argument(
        "--mask_preset",
        choices=MASK_PRESETS,
        help="a built-in mask instead of --mask; random_boxes is drawn with --seed "
        f"({MASK_CONVENTION})",
    )
    parser.add_argument(
        "--num_samples", type=int, default=4, help="completions per image (default 4)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="completion k (counting over all images in order) draws its noise from its own "
        "generator seeded seed + k, so it does not depend on --batch_size (default 0)",
    )
    parser.add_argument(
        "--output", required=True, help="output folder (a new one, or an earlier output)"
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="classifier-free guidance with --class_label: 1 = plain conditional (default 1)",
    )
    parser.add_argument(
        "--class_label",
        type=int,
        default=None,
        help="condition a class-conditional model on this class",
    )
    parser.add_argument(
        "--resample",
        type=int,
        default=0,
        help="RePaint resampling: extra passes per noise level, each diffusing the sample back one "
        "level and redoing the step, so the completion agrees better with the kept pixels; costs "
        "(1 + N) times the sampling time (default 0)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--batch_size", type=int, default=64, help="completions sampled at once (default 64)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cdrl-inpaint``; returns the exit code (2 with a one-line 'error: ...' on bad input)."""
    return run_cli(
        _main,
        argv,
        memory_hint="use a smaller --batch_size or --num_samples (completions per image)",
    )


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)

    # Check the arguments and the output folder before any work.
    check_finite(args, "guidance_scale")
    check_upper_bounds(args, num_samples=MAX_SAMPLES, batch_size=MAX_SAMPLES, resample=MAX_RESAMPLE)
    check_device(args.device)
    for flag in ("num_samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.resample < 0:
        raise CLIError(f"--resample must be >= 0, got {args.resample}")
    if args.guidance_scale < 0:
        raise CLIError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    if args.guidance_scale != 1.0 and args.class_label is None:
        raise CLIError("--guidance_scale needs --class_label (guidance is towards a class)")
    output = _check_output(Path(args.output))
    image_paths = collect_images(args.image, what="image")
    mask_paths = collect_images(args.mask, what="mask") if args.mask else None
    if mask_paths is not None and len(mask_paths) not in (1, len(image_paths)):
        raise CLIError(
            f"got {len(mask_paths)} masks for {len(image_paths)} images; pass one mask for all "
            "images or one per image"
        )

    # Read and check every image and mask before loading the model.
    masks: dict[Path, np.ndarray] = {}
    files = []
    for index, path in enumerate(image_paths):
        image = _open(path, "image")
        mask_path = None if mask_paths is None else mask_paths[index if len(mask_paths) > 1 else 0]
        if mask_path is not None:
            if mask_path not in masks:
                masks[mask_path] = read_mask(mask_path)
            height, width = masks[mask_path].shape
            if (height, width) != (image.height, image.width):
                raise CLIError(
                    f"image {path} is {image.width}x{image.height} but mask {mask_path} is "
                    f"{width}x{height}; they must be the same size"
                )
        files.append((path, image, mask_path))

    # Load the model and check what it can do.
    pipeline = load_pipeline(args.checkpoint, args.device)
    pipeline.set_progress_bar_config(disable=True)
    if len(pipeline.sample_shape) != 3:
        raise CLIError(
            f"checkpoint {args.checkpoint} holds a model of {pipeline.sample_shape[0]}-D points; "
            "inpainting needs an image model"
        )
    channels, size = pipeline.sample_shape[0], pipeline.sample_shape[1]
    _check_class_label(args.class_label, pipeline.condition_sizes, args.checkpoint)

    # Convert to the model's channels and resolution; draw the preset masks.
    rng = np.random.default_rng(args.seed)
    inputs = []
    for path, image, mask_path in files:
        repaint = None if mask_path is None else masks[mask_path]
        inputs.append(
            _prepare(path, image, mask_path, repaint, args.mask_preset, channels, size, rng)
        )

    # Complete: every (image, completion) pair is one sample with its own generator.
    known = torch.from_numpy(np.stack([item.known for item in inputs]))  # (n, c, s, s)
    repaint = torch.from_numpy(np.stack([item.repaint for item in inputs]))[:, None]  # (n, 1, s, s)
    completions = complete(
        pipeline,
        known,
        repaint,
        num_samples=args.num_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        class_label=args.class_label,
        guidance_scale=args.guidance_scale,
        resample=args.resample,
    )

    # Write everything into a temporary folder, then move it into place.
    with atomic_write(output, folder=True) as tmp:
        _write_outputs(tmp, inputs, completions, args)
    total = completions.shape[0] * completions.shape[1]
    print(f"wrote {len(inputs)} panels and {total} completions to {output}")
    return 0


def _check_output(output: Path) -> Path:
    check_output_folder(output)
    check_writable(output / MANIFEST)  # creates nothing; the folder appears once complete
    return output


def _check_class_label(label: int | None, sizes: tuple[int, ...], checkpoint: str) -> None:
    if label is None:
        return
    if not sizes:
        raise CLIError(
            f"--class_label {label} was given, but the model in {checkpoint} is unconditional"
        )
    if not 0 <= label < sizes[0]:
        raise CLIError(
            f"--class_label {label} is outside [0, {sizes[0]}) for the model in {checkpoint}"
        )


def _prepare(
    path: Path,
    image: Image.Image,
    mask_path: Path | None,
    repaint: np.ndarray | None,
    preset: str | None,
    channels: int,
    size: int,
    rng: np.random.Generator,
) -> _Input:
    """Convert one checked image and its mask (or a preset) to the model's channels and size."""
    known, dropped_colour = image_array(image, channels)
    height, width = known.shape[1:]
    if dropped_colour:
        print(f"notice: converted colour image {path} to greyscale for this model", file=sys.stderr)
    mask_source = str(mask_path) if mask_path is not None else f"preset:{preset}"
    if (height, width) != (size, size):
        note = "" if height == width else "; aspect ratio not kept"
        mask_note = f" and mask {mask_path}" if mask_path is not None else ""
        print(
            f"notice: resized image {path}{mask_note} from {width}x{height} to {size}x{size}, "
            f"the model's resolution{note}",
            file=sys.stderr,
        )
        known = resize(known, size)
        if repaint is not None:
            repaint = resize(repaint[None], size, binary=True)[0]
    if repaint is None:
        repaint = preset_mask(preset, size, rng=rng)
    if not repaint.any():
        print(
            f"notice: the mask of {path} repaints no pixel; completions equal the input",
            file=sys.stderr,
        )
    return _Input(
        path, mask_source, known.astype(np.float32), repaint.astype(np.float32), (width, height)
    )


def _write_outputs(folder: Path, inputs: list[_Input], completions: Tensor, args) -> None:
    (folder / "completions").mkdir()
    items = []
    num_samples = completions.shape[1]
    for index, (item, samples) in enumerate(zip(inputs, completions, strict=True)):
        stem = f"{index:03d}_{item.path.stem}"
        known, repaint = torch.from_numpy(item.known), torch.from_numpy(item.repaint)[None]
        to_pil(panel(known, repaint, samples)).save(folder / f"{stem}.png")
        files = []
        for j, sample in enumerate(samples):
            name = f"completions/{stem}_{j}.png"
            to_pil(unit_to_uint8(sample)).save(folder / name)
            files.append({"file": name, "seed": args.seed + index * num_samples + j})
        items.append(
            {
                "image": str(item.path),
                "mask": item.mask_source,
                "original_size": list(item.original_size),
                "resized": item.original_size != tuple(item.known.shape[1:][::-1]),
                "repaint_fraction": float(item.repaint.mean()),
                "panel": f"{stem}.png",
                "completions": files,
            }
        )
    manifest = {
        "checkpoint": str(args.checkpoint),
        "mask_convention": MASK_CONVENTION,
        "mask_preset": args.mask_preset,
        "num_samples": num_samples,
        "seed": args.seed,
        "class_label": args.class_label,
        "guidance_scale": args.guidance_scale,
        "resample": args.resample,
        "resolution": int(completions.shape[-1]),
        "channels": int(completions.shape[2]),
        "panel_columns": ["input", "mask (white = repaint)", "masked input"]
        + [f"completion {j}" for j in range(num_samples)],
        "items": items,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


__all__ = [
    "build_parser",
    "collect_images",
    "image_array",
    "main",
    "read_image",
    "read_mask",
    "resize",
]
