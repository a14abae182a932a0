"""The one source of defaults: a dataclass config tree, loaded from YAML deltas plus ``--set key=value``.

Unknown keys are errors that name the key; values are coerced to the field's type (PyYAML reads ``1e-5``
as a string). Defaults are CDRL's CIFAR-10 settings unless a comment says otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cdrl.checks import MAX_LANGEVIN_STEPS, full_batch_problem, refine_top_problem
from cdrl.toys import TOY_NAMES
from cdrl.utils import ConfigError, atomic_write, short_path


class _PlainLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name``: a few lines can expand to gigabytes, the
    "billion laughs") and without explicit tags (``!!python/...``, ``!!binary``, ``!custom``): a config
    holds plain scalars, lists and mappings only."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases (*{event.anchor}) are not allowed in a config",
                event.start_mark,
            )
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag is not None and tag != "!":
            raise yaml.composer.ComposerError(
                None, None, f"tags ({_short(tag)}) are not allowed in a config", event.start_mark
            )
        return super().compose_node(parent, index)


def _yaml(text: str) -> Any:
    """Plain YAML (``_PlainLoader``); yaml.YAMLError when it is not."""
    return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader without aliases or tags


_REPR = reprlib.Repr()  # Python 3.11's takes no arguments
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 60, 60


def _short(value: Any) -> str:
    """A repr cut to a sane length (a value may be huge or deeply nested)."""
    return _REPR.repr(value)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The first line of a YAML error, with its position: 'aliases ... (line 3, column 8)'."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"[:200]


@dataclass
class DataConfig:
    # digits | mnist5k | cifar10 | folder | 8gaussians | checkerboard | moons | rings
    name: str = "digits"
    # local copy (cifar10: the torchvision root; folder: the image folder)
    data_dir: str | None = None
    download: bool = True  # cifar10: let torchvision download into data_dir when missing
    # folder: resize/center-crop to this size (None: keep the files' size)
    image_size: int | None = None
    channels: int | None = None  # folder: 1 (grayscale) or 3 (RGB); None: 3
    random_flip: bool = False  # random horizontal flip (natural images only; never for digits)
    scale: float = 1.0  # the model sees data * scale (2-D toys: 4.0, as the official toy example)
    toy_size: int = 50_000  # 2-D toys: number of points drawn once, with data.seed
    seed: int = 0  # data generation / split seed
    num_workers: int = 0  # DataLoader workers
    class_conditional: bool = False  # feed class labels to both networks (CDRL Sec. 3.4)
    # probability that a label is replaced by the null label (CFG training)
    uncond_prob: float = 0.1
    # binary conditions: digits [thickness]; toys [xband, yband]
    attributes: list[str] = field(default_factory=list)
    # images: each access returns (k + u) / L * 2 - 1, u ~ U[0, 1) drawn afresh, for the grey level k of
    # L (digits 17, 8-bit images 256): uniform dequantization, the data bits/dim scores (not for 2-D toys)
    dequantize: bool = False


@dataclass
class ScheduleConfig:
    # cdrl: truncated cosine log-SNR; drl: sub-sampled linear betas
    kind: Literal["cdrl", "drl"] = "cdrl"
    num_levels: int = 6  # T, number of EBMs / recovery steps
    logsnr_min: float = -5.1  # cdrl: lambda at the noisiest level (CDRL App. A.1)
    logsnr_max: float = 9.8  # cdrl: lambda at level 0
    beta_start: float = 1e-4  # drl: DDPM beta_1
    beta_end: float = 0.02  # drl: DDPM beta_N
    num_diffusion_steps: int = 1000  # drl: N


@dataclass
class EBMConfig:
    arch: Literal["resnet", "mlp"] = "resnet"
    base_channels: int = 128  # resnet: width of the first resolution; also the time-embedding width
    # per resolution (32, 16, 8, 4)
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 8  # residual blocks per resolution (mlp: per width)
    hidden: int = 128  # mlp: hidden width
    spectral_norm: bool = True  # on every conv/linear except the head (DRL App. B.1)


@dataclass
class InitializerConfig:
    arch: Literal["unet", "mlp", "none"] = "unet"  # none: DRL (chains start at x_{t+1})
    block_out_channels: list[int] = field(default_factory=lambda: [64, 64, 64])
    # attention at 16, 8
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    layers_per_block: int = 4  # diffusers layout; 4 gives CDRL's 3.8M parameters
    dropout: float = 0.1
    norm_num_groups: int = 32
    attention_head_dim: int = 32
    hidden: int = 128  # mlp: hidden width
    num_blocks: int = 2  # mlp: residual blocks


@dataclass
class LangevinConfig:
    n_steps: int = 15  # K per level (CDRL: 15; DRL: 30)
    sample_steps: int | None = None  # K when sampling from the exported model (None: n_steps)
    # sampling: Langevin refinement at the N noisiest levels only (None: every level, the paper); below
    # them the initializer's proposal is kept as is (K = 0). Training refines every level either way.
    refine_top: int | None = None
    b2: float = 4e-4  # b^2 in s_t^2 = b^2 c_t^2 sigma_{t+1}^2 (CDRL: 4e-4; DRL: 2e-4)
    step_scale: float = 1.0  # multiplies every s_t; 1.0 = paper
    # log p = f / s_t^2 - tether (CDRL/DRL App. A.2); False: log p = f - tether
    tempered: bool = True
    noise: bool = True  # Langevin noise (False: gradient descent, for diagnostics)
    # multiplies the Langevin noise when sampling (DRL test time: 0.99); training uses 1
    noise_scale: float = 1.0
    # final denoising step x0 = (x + (1 - alphabar_0) score) / sqrt(alphabar_0)
    tweedie: bool = True
    tweedie_b2: float = 2e-4  # b^2 that scales the score in the Tweedie step (official code: 2e-4)
    # sampling only (off = paper): clamp the x_0 implied by each proposal mean to +-clip_sample_range and
    # re-form the mean from it, as diffusers' clip_sample does for x0-hat at every step
    clip_sample: bool = False
    clip_sample_range: float = 1.0  # in the model's space: data.scale times the data's [-1, 1]


@dataclass
class TrainConfig:
    batch_size: int = 32  # per process and micro-batch (paper: 8 GPUs x 32 = 256)
    # micro-batches per optimizer step (accelerate's accumulate); the
    gradient_accumulation_steps: int = 1
    #   steps, checkpoints, EMA and LR schedule count optimizer steps, as in diffusers' training examples
    max_steps: int = 500_000  # optimizer steps
    ebm_lr: float = 1e-4  # Adam
    init_lr: float = 1e-5  # AdamW
    init_weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 10_000  # linear warmup of both learning rates
    # after warmup (diffusers get_scheduler)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float = 1.0  # max grad norm, both networks
    ema_decay: float = 0.9999  # EMA of both networks, used for sampling and export
    ema_warmup: bool = False  # diffusers EMAModel's decay warmup (useful for short runs)
    variance_reduction: bool = True  # shared eps for the (x_t, x_{t+1}) pair (CDRL App. A.3)
    # extra initializer regression of its mean onto a data target (0 = paper); see README
    init_data_weight: float = 0.0
    # that target in y-space: sqrt(alpha_{t+1}) times
    init_data_target: Literal["paired", "posterior_mean"] = "paired"
    #   paired: the x_t drawn with x_{t+1} (under shared noise, its mean given x_{t+1} is DDIM's, not the recovery mean)
    #   posterior_mean: the DDPM posterior mean mu~(x_0, x_{t+1}), right under any coupling (docs/method.md §13)
    # the EBM learns (and Langevin refines its negatives) at the N noisiest levels only (None: every level,
    # the paper); below them the initializer alone serves, so a step costs far less. Needs
    # langevin.refine_top <= N and, for N < T, langevin.tweedie false (the level-0 EBM is not trained)
    refine_top: int | None = None
    # with refine_top: every example trains the EBM, at a refined level (False: about N / T of them)
    ebm_full_batch: bool = False
    # the lowest N levels take some EBM negatives from persistent chains (0 = paper)
    persistent_levels: int = 0
    # share of those levels' examples whose negative comes from a persistent chain
    persistent_fraction: float = 0.5
    # chains per persistent level (per process), split evenly among label values
    persistent_size: int = 256
    # probability that a chosen chain restarts from the example's fresh chain
    persistent_reset: float = 0.05
    # auto: accelerate launch / accelerate config
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    #   decide (no when neither says); the run's config.yaml records the precision used. bf16 also runs the
    #   training Langevin forwards in bf16
    tf32: bool = True  # CUDA: TF32 in float32 matmuls and cuDNN convs (cdrl.precision.set_tf32)
    channels_last: bool = False  # NHWC conv weights (faster tensor-core convs on GPU)
    # torch.compile both networks in place (cdrl.precision.maybe_compile); slow first steps
    compile: bool = False
    seed: int = 0


@dataclass
class GuardConfig:
    enabled: bool = True  # skip bad steps and roll back (False: stop at the first bad step)
    # |mean E(y-) - E(y+)| above this is a bad step (healthy digits/toy runs: below 1)
    max_energy_gap: float = 1e3
    max_bad_steps: int = 10  # consecutive bad steps before rolling back to the last checkpoint
    lr_factor: float = 0.5  # both learning rates are multiplied by this at each rollback
    max_rollbacks: int = 3  # rollbacks allowed in a run; the next one stops training (exit code 2)


@dataclass
class LogConfig:
    output_dir: str = "runs/cdrl"
    log_every: int = 100  # steps between metric lines (JSONL, trackers)
    sample_every: int = 5_000  # steps between sample grids (0: only at the end)
    num_grid_samples: int = 64  # samples per grid (a square number)
    sample_seed: int = 1234  # fixed noise for comparable grids
    checkpointing_steps: int = 10_000  # steps between resumable checkpoints (0: only at the end)
    checkpoints_total_limit: int | None = 3
    report_to: str = "tensorboard"  # tensorboard | wandb | none (JSONL is always written)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ebm: EBMConfig = field(default_factory=EBMConfig)
    initializer: InitializerConfig = field(default_factory=InitializerConfig)
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    log: LogConfig = field(default_factory=LogConfig)


CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # the recipes, installed with the package
DEFAULT_RECIPE = "digits"  # what `cdrl-train` trains without --config (the README's default)


def recipe_names() -> list[str]:
    """The names of the packaged recipes (``configs/NAME.yaml``)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def config_path(spec: str | Path) -> Path:
    """A config file given as a path, or a packaged recipe given by name (``digits``, ``cifar10``, ...).

    A spec that names an existing file is that file, from any folder; a bare name (no folder, with or
    without ``.yaml``) is looked up among the packaged recipes. Anything else is returned as given, for
    ``load_config`` to report as not found.
    """
    path = Path(spec)
    try:
        if path.is_file() or len(path.parts) != 1:
            return path
    except OSError:  # a name too long or a symlink loop: load_config reports it in one line
        return path
    packaged = CONFIGS_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if packaged.is_file():
        return packaged
    raise ConfigError(
        f"config file not found: {spec} (neither a file nor a packaged recipe: {', '.join(recipe_names())})"
    )


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML delta at ``path``, then ``key.sub=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ConfigError(f"config file not found: {short_path(path)}") from None
        except OSError as err:
            raise ConfigError(
                f"config file {short_path(path)} cannot be read: {err.strerror or err}"
            ) from None
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file {short_path(path)} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML"
            ) from None
        try:
            delta = _yaml(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(
                f"{short_path(path)} is not valid YAML: {_yaml_problem(err)}"
            ) from None
        if not isinstance(delta, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(delta).__name__}")
        _merge(cfg, delta, prefix="")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(
                f"override {_short(item)} is not key=value (example: train.batch_size=64)"
            )
        try:
            parsed = _yaml(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {_short(item)} is not valid YAML: {_yaml_problem(err)}"
            ) from None
        _set(cfg, key.strip(), parsed)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts (for YAML and for trackers)."""
    return dataclasses.asdict(cfg)


def flat(cfg: Config) -> dict[str, Any]:
    """{'train.batch_size': 32, ...} with lists as strings, for trackers that take scalars only."""
    out = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            out[f"{section}.{key}"] = (
                value if isinstance(value, int | float | str | bool) else str(value)
            )
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the config as YAML, atomically (a temporary sibling renamed into place)."""
    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _merge(node: Any, delta: dict, prefix: str) -> None:
    for key, value in delta.items():
        _assign(node, str(key), value, f"{prefix}{key}")


def _set(cfg: Config, dotted: str, value: Any) -> None:
    node, *_, leaf = [cfg, *dotted.split(".")]
    parts = dotted.split(".")
    for depth, part in enumerate(parts[:-1]):
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in names:
            hint = _did_you_mean(part, names, parts[:depth], parts[depth + 1 :])
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        node = getattr(node, part)
    _assign(node, leaf, value, dotted)


def _assign(node: Any, key: str, value: Any, dotted: str) -> None:
    if not dataclasses.is_dataclass(node):
        raise ConfigError(f"unknown config key {dotted!r}")
    names = [f.name for f in dataclasses.fields(node)]
    if key not in names:
        raise ConfigError(
            f"unknown config key {dotted!r}{_did_you_mean(key, names, dotted.split('.')[:-1])}; "
            f"known keys here: "
            f"{', '.join(names)}"
        )
    current = getattr(node, key)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {dotted!r} is a section; give it a mapping of keys")
        _merge(current, value, prefix=f"{dotted}.")
        return
    setattr(node, key, _coerce(value, typing.get_type_hints(type(node))[key], dotted))


def _did_you_mean(
    name: str, names: Sequence[str], before: Sequence[str] = (), after: Sequence[str] = ()
) -> str:
    """' (did you mean 'train.batch_size'?)' when ``name`` is close to one of ``names``, else ''."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean {'.'.join([*before, close[0], *after])!r}?)" if close else ""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise ConfigError(
                f"config key {key!r} must be one of {', '.join(map(repr, args))}, got {_short(value)}"
            )
        return value
    if origin is list:
        if isinstance(value, str):
            value = (
                _yaml(value)
                if value.strip().startswith("[")
                else [v for v in value.split(",") if v]
            )
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r} must be a list, got {_short(value)}")
        return [_coerce(v, args[0], key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r} must be true or false, got {_short(value)}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"config key {key!r} must be an integer, got {_short(value)}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(
                f"config key {key!r} must be an integer, got {_short(value)}"
            ) from None
        if not math.isfinite(number) or number != int(number):
            raise ConfigError(f"config key {key!r} must be an integer, got {_short(value)}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be a number, got {_short(value)}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r} must be a number, got {_short(value)}") from None
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"config key {key!r} must be a string, got {_short(value)}")
        return str(value)
    raise ConfigError(f"config key {key!r} has an unsupported type {hint}")


NAME_MAX = 255  # bytes in one file or folder name (ext4, XFS, APFS, NTFS)
# Upper bounds of counts: a value beyond them would exhaust memory or run for years, and is far more
# likely a typo than a plan (DRL's largest model has T = 1,000 levels; the papers train 10^6 steps).
MAX_COUNTS = {
    "schedule.num_levels": 10_000,
    "schedule.num_diffusion_steps": 1_000_000,
    "langevin.n_steps": MAX_LANGEVIN_STEPS,
    "langevin.sample_steps": MAX_LANGEVIN_STEPS,
    "train.batch_size": 1_000_000,
    "train.gradient_accumulation_steps": 10_000,
    "train.max_steps": 1_000_000_000,
    "train.warmup_steps": 1_000_000_000,
    "train.persistent_size": 10_000_000,
    "log.num_grid_samples": 10_000,
    "data.num_workers": 1_024,
}
INFINITE_OK = {"guard.max_energy_gap"}  # .inf turns the energy-gap guard off


def check_dequantize(data: DataConfig) -> None:
    """ConfigError when ``data.dequantize`` is on for data without grey levels (the continuous 2-D toys)."""
    if data.dequantize and data.name in TOY_NAMES:
        raise ConfigError(
            f"data.dequantize needs images with known grey levels, but data.name={data.name} is "
            "continuous 2-D data; set data.dequantize=false"
        )


def validate(cfg: Config) -> None:
    """Reject impossible values with a message that names the key; every number must be finite (except
    ``INFINITE_OK``)."""
    checks = [
        (cfg.schedule.num_levels >= 1, "schedule.num_levels must be >= 1"),
        (
            cfg.schedule.logsnr_max > cfg.schedule.logsnr_min,
            "schedule.logsnr_max must exceed schedule.logsnr_min",
        ),
        (cfg.langevin.n_steps >= 0, "langevin.n_steps must be >= 0"),
        (
            cfg.langevin.sample_steps is None or cfg.langevin.sample_steps >= 0,
            "langevin.sample_steps must be >= 0",
        ),
        (cfg.langevin.b2 > 0, "langevin.b2 must be > 0"),
        (cfg.langevin.step_scale > 0, "langevin.step_scale must be > 0"),
        (cfg.langevin.noise_scale >= 0, "langevin.noise_scale must be >= 0"),
        (cfg.langevin.clip_sample_range > 0, "langevin.clip_sample_range must be > 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (
            cfg.train.gradient_accumulation_steps >= 1,
            "train.gradient_accumulation_steps must be >= 1",
        ),
        (cfg.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (
            cfg.train.ebm_lr > 0 and cfg.train.init_lr > 0,
            "train.ebm_lr and train.init_lr must be > 0",
        ),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (cfg.train.grad_clip > 0, "train.grad_clip must be > 0"),
        (0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay must be in [0, 1)"),
        (0.0 <= cfg.data.uncond_prob <= 1.0, "data.uncond_prob must be in [0, 1]"),
        (cfg.data.scale > 0, "data.scale must be > 0"),
        (cfg.log.log_every >= 1, "log.log_every must be >= 1"),
        (
            cfg.log.sample_every >= 0 and cfg.log.checkpointing_steps >= 0,
            "log.sample_every and log.checkpointing_steps must be >= 0",
        ),
        (cfg.log.num_grid_samples >= 1, "log.num_grid_samples must be >= 1"),
        (
            cfg.log.checkpoints_total_limit is None or cfg.log.checkpoints_total_limit >= 1,
            "log.checkpoints_total_limit must be >= 1",
        ),
        (
            len(cfg.initializer.attention_levels) == len(cfg.initializer.block_out_channels),
            "initializer.attention_levels needs one entry per initializer.block_out_channels",
        ),
        (
            cfg.schedule.kind != "drl" or cfg.schedule.num_levels >= 2,
            "schedule.kind=drl needs schedule.num_levels >= 2",
        ),
        (cfg.langevin.tweedie_b2 > 0, "langevin.tweedie_b2 must be > 0"),
        (
            0 <= cfg.train.persistent_levels <= cfg.schedule.num_levels,
            "train.persistent_levels must be in [0, schedule.num_levels]",
        ),
        (
            0.0 <= cfg.train.persistent_fraction <= 1.0
            and 0.0 <= cfg.train.persistent_reset <= 1.0,
            "train.persistent_fraction and train.persistent_reset must be in [0, 1]",
        ),
        (cfg.train.persistent_size >= 1, "train.persistent_size must be >= 1"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (
            0.0 <= cfg.train.adam_beta1 < 1.0 and 0.0 <= cfg.train.adam_beta2 < 1.0,
            "train.adam_beta1 and train.adam_beta2 must be in [0, 1)",
        ),
        (
            cfg.train.init_weight_decay >= 0 and cfg.train.init_data_weight >= 0,
            "train.init_weight_decay and train.init_data_weight must be >= 0",
        ),
        (
            min(cfg.ebm.base_channels, cfg.ebm.hidden, cfg.ebm.num_res_blocks) >= 1,
            "ebm.base_channels, ebm.hidden and ebm.num_res_blocks must be >= 1",
        ),
        (
            len(cfg.ebm.channel_mult) >= 1 and min(cfg.ebm.channel_mult, default=0) >= 1,
            "ebm.channel_mult needs at least one entry, each >= 1",
        ),
        (
            len(cfg.initializer.block_out_channels) >= 1
            and min(cfg.initializer.block_out_channels, default=0) >= 1,
            "initializer.block_out_channels needs at least one entry, each >= 1",
        ),
        (
            min(
                cfg.initializer.layers_per_block,
                cfg.initializer.norm_num_groups,
                cfg.initializer.attention_head_dim,
                cfg.initializer.hidden,
            )
            >= 1,
            "initializer.layers_per_block, norm_num_groups, attention_head_dim and hidden must be >= 1",
        ),
        (0.0 <= cfg.initializer.dropout < 1.0, "initializer.dropout must be in [0, 1)"),
        (cfg.guard.max_energy_gap > 0, "guard.max_energy_gap must be > 0 (.inf turns it off)"),
        (cfg.guard.max_bad_steps >= 1, "guard.max_bad_steps must be >= 1"),
        (0.0 < cfg.guard.lr_factor < 1.0, "guard.lr_factor must be in (0, 1)"),
        (cfg.guard.max_rollbacks >= 0, "guard.max_rollbacks must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    lv, tr = cfg.langevin, cfg.train
    problem = refine_top_problem(cfg.schedule.num_levels, lv.refine_top, tr.refine_top, lv.tweedie)
    problem = problem or full_batch_problem(tr.ebm_full_batch, tr.refine_top, tr.persistent_levels)
    if problem is not None:
        raise ConfigError(problem)
    check_dequantize(cfg.data)
    for key, limit in MAX_COUNTS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value > limit:
            raise ConfigError(f"{key} must be at most {limit:,}, got {value:,}")
    for key, path in (("log.output_dir", cfg.log.output_dir), ("data.data_dir", cfg.data.data_dir)):
        too_long = [part for part in Path(path or ".").parts if len(part.encode()) > NAME_MAX]
        if too_long:
            raise ConfigError(
                f"{key} holds a name of {len(too_long[0].encode())} bytes ({short_path(too_long[0], 40)}); "
                f"file systems allow {NAME_MAX}"
            )
    for section in dataclasses.fields(cfg):
        for item in dataclasses.fields(getattr(cfg, section.name)):
            key, value = (
                f"{section.name}.{item.name}",
                getattr(getattr(cfg, section.name), item.name),
            )
            if isinstance(value, float) and not math.isfinite(value) and key not in INFINITE_OK:
                raise ConfigError(f"{key} must be a finite number, got {value}")
