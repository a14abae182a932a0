"""The diffusion baseline of the digits comparison: diffusers' ``UNet2DModel`` trained with ``DDPMScheduler``.

What a user would pick instead of an EBM. Trains an epsilon-prediction UNet on the 8x8 digits in [-1, 1] for a
step count or a wall-clock budget, keeps an EMA of its weights, and saves a diffusers ``DDPMPipeline`` (the UNet
as safetensors plus the DDPM scheduler). ``sample_diffusion`` draws samples with DDPM's ancestral sampler or
DDIM (eta = 0) at any number of steps, one UNet evaluation per step.

Usage:
  python experiments/diffusion_baseline.py --output_dir runs/compare/diffusion --max_steps 12000
  python experiments/diffusion_baseline.py --output_dir runs/compare/diffusion --minutes 8
  python experiments/diffusion_baseline.py --sample runs/compare/diffusion --scheduler ddim --num_steps 20 \
      --num_samples 100 --grid ddim20.png
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import Tensor

from cdrl.config import DataConfig
from cdrl.data import load_dataset
from cdrl.images import save_grid
from cdrl.utils import git_sha

# The default UNet: two resolutions (8, 4), 32/56 channels, one ResNet block per level, no attention. About
# 0.53M parameters, against 0.51M for the CDRL digits default's EBM (0.24M) and initializer (0.27M) together.
DEFAULT_UNET: dict[str, Any] = {
    "block_out_channels": (32, 56),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
SAMPLERS = ("ddpm", "ddim")


def build_unet(
    *,
    sample_size: int = 8,
    in_channels: int = 1,
    block_out_channels: tuple[int, ...] = DEFAULT_UNET["block_out_channels"],
    layers_per_block: int = DEFAULT_UNET["layers_per_block"],
    norm_num_groups: int = DEFAULT_UNET["norm_num_groups"],
) -> UNet2DModel:
    """A small diffusers ``UNet2DModel`` without attention: one resolution per entry of ``block_out_channels``."""
    levels = len(block_out_channels)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=norm_num_groups,
    )


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def digits_train_images() -> Tensor:
    """(1437, 1, 8, 8) float32 training digits in [-1, 1] (the same split the EBMs train on)."""
    dataset = load_dataset(DataConfig(name="digits"), split="train")
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def train_diffusion(
    output_dir: str | Path,
    *,
    minutes: float | None = None,
    max_steps: int | None = None,
    images: Tensor | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    warmup_steps: int = 100,
    ema_decay: float = 0.999,
    grad_clip: float = 1.0,
    num_train_timesteps: int = 1000,
    seed: int = 0,
    log_every: int = 500,
) -> dict[str, Any]:
    """Train a UNet2DModel with the DDPM loss ||eps - eps_theta(x_k, k)||^2 (DDPM Eq. (14)) and save it.

    Training stops at ``max_steps`` or when the loop has run ``minutes`` of wall-clock time, whichever comes
    first (at least one must be given). The EMA weights are saved as a ``DDPMPipeline`` in
    ``output_dir/pipeline``; ``output_dir/train.json`` holds the settings and timings, ``output_dir/log.jsonl``
    the loss every ``log_every`` steps.

    Args:
        output_dir: the run folder (created).
        minutes: wall-clock budget of the training loop.
        max_steps: optimizer steps.
        images: (n, c, h, w) training images in [-1, 1]; default the digits train split.
        unet_kwargs: ``build_unet`` arguments (default ``DEFAULT_UNET``).
        batch_size, learning_rate, warmup_steps, ema_decay, grad_clip: AdamW with linear warmup, grad-norm
            clipping, diffusers' ``EMAModel`` with decay warmup.
        num_train_timesteps: N of the DDPM scheduler (linear betas 1e-4 .. 0.02).
        seed: seeds the weights, the batches and the noise.

    Returns:
        A JSON-ready dict: ``steps``, ``loop_seconds`` (wall), ``loop_cpu_seconds``, ``steps_per_second``,
        ``num_parameters``, ``final_loss``, ``pipeline`` (the saved folder) and the settings.
    """
    if minutes is None and max_steps is None:
        raise ValueError("give train_diffusion a budget: minutes, max_steps or both")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    x_data = digits_train_images() if images is None else images.float()
    if len(x_data) < batch_size:
        raise ValueError(f"{len(x_data)} training images, fewer than batch_size={batch_size}")
    unet_kwargs = {**DEFAULT_UNET, **(unet_kwargs or {})}
    torch.manual_seed(seed)
    unet = build_unet(sample_size=x_data.shape[-1], in_channels=x_data.shape[1], **unet_kwargs)
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
    ema_unet = copy.deepcopy(unet)
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    lr_sched = get_scheduler(
        "constant_with_warmup", optimizer, num_warmup_steps=warmup_steps, num_training_steps=1
    )
    generator = torch.Generator().manual_seed(seed)
    alphas_cumprod = scheduler.alphas_cumprod

    # Train: one noise level per example, epsilon prediction (DDPM Alg. 1).
    unet.train()
    step, loss_sum, n_sum, last_loss = 0, 0.0, 0, float("nan")
    budget = None if minutes is None else 60.0 * minutes
    log_path = output_dir / "log.jsonl"
    log_path.write_text("")
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    done = False
    while not done:
        order = torch.randperm(len(x_data), generator=generator)
        for index in order[: len(order) - len(order) % batch_size].split(batch_size):
            x0 = x_data[index]  # (b, c, h, w)
            noise = torch.randn(x0.shape, generator=generator)
            k = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator)
            ab = alphas_cumprod[k].reshape(-1, 1, 1, 1)
            x_k = ab.sqrt() * x0 + (1 - ab).sqrt() * noise  # q(x_k | x_0) (DDPM Eq. (4))
            loss = F.mse_loss(unet(x_k, k).sample.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
            optimizer.step()
            lr_sched.step()
            ema.step(unet.parameters())
            step += 1
            loss_sum, n_sum = loss_sum + loss.item(), n_sum + 1
            elapsed = time.perf_counter() - start_wall
            if step % log_every == 0:
                last_loss = loss_sum / n_sum
                with log_path.open("a") as f:
                    record = {
                        "step": step,
                        "loss": round(last_loss, 6),
                        "elapsed_s": round(elapsed, 2),
                    }
                    f.write(json.dumps(record) + "\n")
                loss_sum, n_sum = 0.0, 0
            if (max_steps is not None and step >= max_steps) or (
                budget is not None and elapsed >= budget
            ):
                done = True
                break
    loop_seconds = time.perf_counter() - start_wall
    loop_cpu_seconds = time.process_time() - start_cpu
    if n_sum:
        last_loss = loss_sum / n_sum

    # Export the EMA weights as a diffusers pipeline (safetensors + scheduler config).
    ema.copy_to(ema_unet.parameters())
    pipeline_dir = output_dir / "pipeline"
    DDPMPipeline(unet=ema_unet.eval(), scheduler=scheduler).save_pretrained(
        pipeline_dir, safe_serialization=True
    )
    summary = {
        "steps": step,
        "loop_seconds": round(loop_seconds, 2),
        "loop_cpu_seconds": round(loop_cpu_seconds, 2),
        "steps_per_second": round(step / max(loop_seconds, 1e-9), 3),
        "num_parameters": num_parameters(unet),
        "final_loss": round(last_loss, 6),
        "pipeline": str(pipeline_dir),
        "settings": {
            "minutes": minutes,
            "max_steps": max_steps,
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_kwargs.items()},
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "warmup_steps": warmup_steps,
            "ema_decay": ema_decay,
            "grad_clip": grad_clip,
            "num_train_timesteps": num_train_timesteps,
            "seed": seed,
            "num_threads": torch.get_num_threads(),
        },
        "git_sha": git_sha(),
    }
    (output_dir / "train.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_diffusion(folder: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """The UNet (eval mode) and DDPM scheduler saved by ``train_diffusion``: a run folder or its ``pipeline``."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() and (folder / "pipeline").is_dir():
        folder = folder / "pipeline"
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no diffusers pipeline in {folder}; train one with train_diffusion"
        )
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return unet, scheduler


@torch.no_grad()
def sample_diffusion(
    model: UNet2DModel,
    scheduler_name: Literal["ddpm", "ddim"],
    num_steps: int,
    n: int,
    generator: torch.Generator | None = None,
    *,
    train_scheduler: DDPMScheduler | None = None,
    batch_size: int = 500,
    clip_sample: bool | None = None,
) -> Tensor:
    """Sample ``n`` images with ``num_steps`` UNet evaluations each.

    ``ddpm`` is the ancestral sampler (DDPM Alg. 2) on a strided subset of the training steps; ``ddim`` is
    DDIM with eta = 0 (deterministic after x_N). Both use "trailing" timestep spacing, so the first step is
    always at the last training step k = N - 1 (Lin et al. 2023, Table 2); diffusers' default "leading"
    spacing starts few-step chains at a less noisy level than x_N ~ N(0, I) really is.

    Args:
        model: the UNet (eps prediction).
        scheduler_name: "ddpm" or "ddim".
        num_steps: sampling steps = UNet evaluations per sample, 1 .. N.
        n: number of samples.
        generator: draws the initial noise and DDPM's per-step noise.
        train_scheduler: the scheduler the model was trained with (default: diffusers' DDPM defaults).
        batch_size: samples per UNet call.
        clip_sample: clamp the predicted x_0 to [-1, 1] at every step (diffusers' ``clip_sample``);
            None keeps the training scheduler's setting (diffusers' default: True).

    Returns:
        (n, c, h, w) float32 CPU samples in [-1, 1].
    """
    if scheduler_name not in SAMPLERS:
        raise ValueError(f"scheduler_name must be one of {SAMPLERS}, got {scheduler_name!r}")
    config = (train_scheduler or DDPMScheduler()).config
    kind = DDPMScheduler if scheduler_name == "ddpm" else DDIMScheduler
    overrides = {} if clip_sample is None else {"clip_sample": clip_sample}
    scheduler = kind.from_config(config, timestep_spacing="trailing", **overrides)
    if not 1 <= num_steps <= config.num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {config.num_train_timesteps}], got {num_steps}")
    device = next(model.parameters()).device
    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    chunks = []
    for start in range(0, n, batch_size):
        scheduler.set_timesteps(num_steps)
        x = torch.randn(min(batch_size, n - start), *shape, generator=generator).to(device)
        for k in scheduler.timesteps:
            eps = model(x, k.to(device)).sample
            x = scheduler.step(eps, k, x, generator=generator).prev_sample
        chunks.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, *shape)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, help="train into this run folder")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the loop")
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--train_batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=Path, default=None, help="sample a trained run folder")
    parser.add_argument("--scheduler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--num_steps", type=int, default=1000, help="sampling steps (NFE)")
    parser.add_argument("--num_samples", type=int, default=100)
    parser.add_argument("--grid", type=Path, default=None, help="save the samples as a PNG grid")
    args = parser.parse_args(argv)
    if args.sample is not None:
        unet, scheduler = load_diffusion(args.sample)
        x = sample_diffusion(
            unet,
            args.scheduler,
            args.num_steps,
            args.num_samples,
            torch.Generator().manual_seed(args.seed),
            train_scheduler=scheduler,
        )
        print(f"{len(x)} samples, mean {x.mean():.3f}, std {x.std():.3f}")
        if args.grid is not None:
            save_grid(x, args.grid, upscale=4)
            print(f"grid: {args.grid}")
        return 0
    if args.output_dir is None:
        parser.error("give --output_dir (train) or --sample DIR")
    if args.minutes is None and args.max_steps is None:
        parser.error("give --minutes, --max_steps or both")
    summary = train_diffusion(
        args.output_dir,
        minutes=args.minutes,
        max_steps=args.max_steps,
        batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
