"""``CDRLPipeline``: diffusers-style generation from a trained EBM + initializer, and its small scheduler.

Loading is safe: network weights come from safetensors files only (pickle files are refused, never
unpickled), and each network's weights must match the ``config.json`` beside them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from cdrl import precision as prec
from cdrl.checks import (
    MAX_LANGEVIN_STEPS,
    MAX_RESAMPLE,
    MAX_SAMPLES,
    check_generator,
    check_image,
    check_int,
    check_labels,
    check_number,
    scheduler_problem,
)
from cdrl.config import Config, LangevinConfig
from cdrl.data import PIXEL_LEVELS, requantize
from cdrl.guidance import NEGATIONS, Conditioning, null_condition
from cdrl.sampling import sample, total_langevin_steps
from cdrl.schedule import NoiseSchedule, make_schedule
from cdrl.utils import randn_like
from cdrl.weights import (
    check_configs,
    check_pipeline_weights,
    weights_mismatch,
)


class CDRLScheduler(SchedulerMixin, ConfigMixin):
    """Holds the noise levels and the Langevin settings a model was trained with (no state of its own).

    ``condition_offsets`` (conditional models): per condition, a (T, size) nested list of the EBM's
    implicit-classifier offsets, fitted on training data (``cdrl.calibration``); composition with
    ``negation="posterior"`` needs them. ``num_bins``: the grey levels of dequantized training data
    (``data.dequantize``); samples are returned as the level whose bin they fall in (``requantize``).
    """

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(
        self,
        kind: str = "cdrl",
        num_levels: int = 6,
        logsnr_min: float = -5.1,
        logsnr_max: float = 9.8,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_diffusion_steps: int = 1000,
        n_steps: int = 15,
        refine_top: int | None = None,
        b2: float = 4e-4,
        step_scale: float = 1.0,
        tempered: bool = True,
        noise: bool = True,
        noise_scale: float = 1.0,
        tweedie: bool = True,
        tweedie_b2: float = 2e-4,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        data_scale: float = 1.0,
        condition_offsets: list[list[list[float]]] | None = None,
        num_bins: int | None = None,
    ) -> None:
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        problem = scheduler_problem(settings)
        if problem is not None:
            raise ValueError(f"CDRLScheduler: {problem}")
        self.schedule: NoiseSchedule = make_schedule(
            kind,
            num_levels=num_levels,
            logsnr_min=logsnr_min,
            logsnr_max=logsnr_max,
            beta_start=beta_start,
            beta_end=beta_end,
            num_diffusion_steps=num_diffusion_steps,
        )

    @classmethod
    def from_training_config(cls, cfg: Config) -> CDRLScheduler:
        """The scheduler a training config implies; sampling uses ``langevin.sample_steps`` when set."""
        langevin = dataclasses.asdict(cfg.langevin)
        sample_steps = langevin.pop("sample_steps")
        if sample_steps is not None:
            langevin["n_steps"] = sample_steps
        bins = PIXEL_LEVELS.get(cfg.data.name) if cfg.data.dequantize else None
        schedule = dataclasses.asdict(cfg.schedule)
        return cls(**schedule, **langevin, data_scale=cfg.data.scale, num_bins=bins)

    def langevin_settings(self, **overrides) -> LangevinConfig:
        """The stored Langevin settings, with any non-None override applied."""
        fields = {
            f.name: self.config[f.name]
            for f in dataclasses.fields(LangevinConfig)
            if f.name in self.config
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return LangevinConfig(**fields)


# diffusers' community-pipeline route: an exported folder names its pipeline class as
# [PIPELINE_MODULE, "CDRLPipeline"] in model_index.json and carries PIPELINE_MODULE.py, so
# ``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` finds the class. The file
# only imports cdrl's own class; CDRLPipeline.from_pretrained never runs it (``load_config``).
PIPELINE_MODULE = "pipeline_cdrl"
PIPELINE_MODULE_TEXT = (
    '"""diffusers\' community-pipeline entry for a folder cdrl exported: '
    "DiffusionPipeline.from_pretrained(folder,\n"
    'trust_remote_code=True) runs this file, which imports cdrl\'s pipeline (pip install cdrl)."""\n\n'
    "from cdrl.pipeline import CDRLPipeline  # noqa: F401\n"
)


class CDRLPipeline(DiffusionPipeline):
    """Sample from a CDRL (or DRL, with no initializer) model.

    >>> pipe = CDRLPipeline.from_pretrained("runs/digits/pipeline")
    >>> images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0)).images
    """

    model_cpu_offload_seq = "initializer->ebm"
    _optional_components = ["initializer"]

    def __init__(self, ebm, initializer, scheduler: CDRLScheduler) -> None:
        super().__init__()
        self.register_modules(ebm=ebm, initializer=initializer, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> CDRLPipeline:
        """diffusers' ``from_pretrained``, restricted to safetensors weights that match their configs.

        Raises:
            ValueError: ``use_safetensors=False``; a network folder with pickle weights only, or none; a
                weights file that is not safetensors; weights whose names or shapes differ from the
                network its ``config.json`` builds (diffusers would ignore extra tensors).
        """
        from diffusers.utils import logging as diffusers_logging

        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                "CDRLPipeline loads safetensors weights only; use_safetensors=False is refused"
            )
        dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
        if dtype not in (None, torch.float32):
            raise ValueError(
                f"torch_dtype={dtype} is not supported: CDRLPipeline keeps its networks "
                "and the Langevin chains in float32 (pass precision='bf16' to the call for autocast)"
            )
        kwargs["use_safetensors"] = True
        # Spectral-norm networks built on the meta device run their power iteration very slowly (30 s
        # against 2 s for the paper-size EBM), so build them on the CPU unless the caller says otherwise.
        kwargs.setdefault("low_cpu_mem_usage", False)
        local = folder.is_dir()
        if local:
            check_configs(folder)
        verbosity = diffusers_logging.get_verbosity()
        # Unused weights are an error (each network's from_pretrained, SafetensorsOnly), not a warning.
        diffusers_logging.set_verbosity_error()
        try:
            pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError, RuntimeError):
            if local:
                check_pipeline_weights(folder)  # a clearer message, naming the file
            raise
        finally:
            diffusers_logging.set_verbosity(verbosity)
        return pipeline

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config``, reading the community-pipeline class name [module, class] as the
        class itself: loading through ``CDRLPipeline`` uses this class and runs no code from the folder."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config, dict) and isinstance(config.get("_class_name"), list | tuple):
            config["_class_name"] = str(config["_class_name"][-1])
        return out

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' ``save_pretrained`` (safetensors), plus what lets ``DiffusionPipeline.from_pretrained``
        load the folder as a community pipeline: ``PIPELINE_MODULE.py`` and its name in model_index.json."""
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "save the pipeline, then upload the folder (cdrl-train --push_to_hub does both)"
            )
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [PIPELINE_MODULE, "CDRLPipeline"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (folder / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_MODULE_TEXT)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (c, h, w) for images, (d,) for vectors."""
        config = self.ebm.config
        if "in_features" in config:
            return (config.in_features,)
        return (config.in_channels, config.sample_size, config.sample_size)

    @property
    def condition_sizes(self) -> tuple[int, ...]:
        """Values per condition (the class label first); () for an unconditional model."""
        return tuple(self.ebm.config.condition_sizes or ())

    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_langevin_steps: int | None = None,
        langevin_noise_scale: float | None = None,
        clip_sample: bool | None = None,
        refine_top: int | None = None,
        class_labels: Sequence[int] | Tensor | None = None,
        guidance_scale: float = 1.0,
        image: Tensor | PIL.Image.Image | list[PIL.Image.Image] | None = None,
        mask_image: Tensor | PIL.Image.Image | list[PIL.Image.Image] | None = None,
        num_samples_per_image: int = 1,
        resample: int = 0,
        compose: Sequence[tuple[Sequence[int | None], float]] | None = None,
        negation: str = "linear",
        output_type: str = "pil",
        return_dict: bool = True,
        precision: str = "fp32",
    ) -> ImagePipelineOutput | tuple:
        """Generate ``batch_size`` samples.

        Args:
            batch_size: number of samples (at most ``cdrl.checks.MAX_SAMPLES``); with ``class_labels`` or
                ``image`` leave it out (one sample per label / per image and completion): a different
                value is an error, not ignored.
            generator: a generator, or one per sample (then sample i does not depend on the batch).
            num_langevin_steps: K per level (default: the trained value; at most 100,000).
            langevin_noise_scale: multiplies the Langevin noise (default: the stored ``noise_scale``; 0 gives
                gradient descent on the energy, as some EBM samplers do at test time).
            clip_sample: clamp the x_0 each proposal mean implies to the data range and re-form the mean,
                as diffusers' ``clip_sample`` (default: the stored setting, off unless trained with it).
            refine_top: Langevin refinement at this many of the noisiest levels only, the initializer's
                proposal kept as is below them (default: the stored ``refine_top``; ``num_levels``: all).
            class_labels: one class id per sample for a class-conditional model; None samples the
                unconditional model (the null label).
            guidance_scale: classifier-free guidance, diffusers' meaning: 1 = plain conditional, > 1 stronger
                (the paper's w = guidance_scale - 1).
            output_type: "pil" (list of images), "np" ((b, h, w, c) in [0, 1]), "pt" ((b, c, h, w) in [0, 1]).
                For vector data "pt"/"np" return the raw (b, d) samples.
            image: inpainting: the images to complete, (n, c, h, w) in [0, 1] or PIL images of the model's size.
            mask_image: inpainting mask, diffusers' convention: 1 / white = repaint, 0 / black = keep;
                (n, 1 or c, h, w) in [0, 1] or PIL images. Values are rounded to {0, 1}.
            num_samples_per_image: completions per inpainting image (batch_size is then n * this).
            resample: extra passes per level, each diffusing x_t back to x_{t+1} and redoing the step
                (RePaint's resampling, jump length 1): the unknown pixels harmonize with the known ones.
                Meant for inpainting; costs (1 + resample) times the network evaluations.
            compose: product of experts over conditions: (labels, weight) pairs, where labels gives one value
                per condition (class first, then attributes) and None leaves that condition null. The energy is
                E(null) + sum_k weight_k (E(c_k) - E(null)); a negative weight means NOT (CDRL Sec. 4.4).
            negation: how a negative compose weight acts: "linear" (the formula above, unbounded: strong
                negations also push samples off the data) or "posterior" (adds |weight| log p(not c | y)
                from the EBM's implicit classifier over the condition's values: bounded, so samples stay
                on the data; each negated term must set one condition, and the model needs calibrated
                offsets, which ``train.py`` stores and ``cdrl-calibrate`` adds to older checkpoints).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            precision: "fp32", or "bf16" to run the network forwards under autocast (GPU); the Langevin
                state and its gradient stay float32 either way.
        """
        device = self.device
        self._check_arguments(
            batch_size,
            num_langevin_steps,
            langevin_noise_scale,
            guidance_scale,
            image,
            mask_image,
            num_samples_per_image,
            resample,
            class_labels,
            compose,
            output_type,
        )
        guidance_scale, resample = float(guidance_scale), int(resample)
        known = known_mask = None
        if image is not None:
            known, known_mask = self._inpainting_inputs(
                image, mask_image, num_samples_per_image, device
            )
            if batch_size != 1 and batch_size != known.shape[0]:
                raise ValueError(
                    f"batch_size={batch_size}, but inpainting makes one sample per image and "
                    f"num_samples_per_image: {known.shape[0]}; leave batch_size out"
                )
            batch_size = known.shape[0]
            if class_labels is not None and len(class_labels) != batch_size:
                class_labels = torch.as_tensor(class_labels).repeat_interleave(
                    num_samples_per_image
                )
        null, terms = None, ()
        if class_labels is not None:
            labels = self._check_labels(class_labels, device)
            if batch_size != 1 and batch_size != labels.shape[0] and image is None:
                raise ValueError(
                    f"batch_size={batch_size}, but {labels.shape[0]} class_labels were given (one "
                    "sample per label); leave batch_size out or give one label per sample"
                )
            batch_size = labels.shape[0]
            null = self._null(batch_size, device)
            cond = null.clone()
            cond[:, 0] = labels
            terms = ((cond, guidance_scale),)
        elif compose is not None:
            null = self._null(batch_size, device)
            terms = self._compose_terms(compose, batch_size, device)
        elif self.condition_sizes:
            null = self._null(batch_size, device)
        if guidance_scale != 1.0 and class_labels is None:
            raise ValueError(
                "guidance_scale needs class_labels (it scales the class condition against the null label)"
            )
        if negation not in NEGATIONS:
            raise ValueError(f"negation must be one of {', '.join(NEGATIONS)}, got {negation!r}")
        check_generator(generator, batch_size)
        if clip_sample is not None and not isinstance(clip_sample, bool):
            raise ValueError(f"clip_sample must be True or False, got {clip_sample!r}")
        schedule = self.scheduler.schedule
        if refine_top is not None:
            check_int("refine_top", refine_top, minimum=0, maximum=schedule.num_levels)
        overrides = {"clip_sample": clip_sample, "refine_top": refine_top}
        settings = self.scheduler.langevin_settings(
            n_steps=num_langevin_steps, noise_scale=langevin_noise_scale, **overrides
        )
        x_top = randn_like(torch.empty(batch_size, *self.sample_shape, device=device), generator)
        steps = total_langevin_steps(settings, schedule.num_levels)
        bar = self.progress_bar(total=steps * (1 + int(resample)))
        dtype = prec.autocast_dtype(precision)
        ebm, initializer = self.ebm, self.initializer
        if dtype is not None:
            ebm = prec.AutocastModule(ebm, dtype)
            initializer = None if initializer is None else prec.AutocastModule(initializer, dtype)
        x = sample(
            ebm,
            initializer,
            schedule,
            x_top,
            settings,
            cond=Conditioning(
                null=null,
                terms=terms,
                negation=negation,
                offsets=self._condition_offsets(device) if negation == "posterior" else None,
            ),
            generator=generator,
            known=known,
            known_mask=known_mask,
            resample=resample,
            callback=lambda t, k, y: bar.update(1),
        )
        bar.close()
        images = self._postprocess(x / self.scheduler.config.data_scale, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _check_arguments(
        self,
        batch_size,
        num_langevin_steps,
        langevin_noise_scale,
        guidance_scale,
        image,
        mask_image,
        num_samples_per_image,
        resample,
        class_labels,
        compose,
        output_type,
    ) -> None:
        """Refuse bad values and combinations in which one argument would be silently ignored."""
        check_int("batch_size", batch_size, minimum=1, maximum=MAX_SAMPLES)
        check_int("num_samples_per_image", num_samples_per_image, minimum=1, maximum=MAX_SAMPLES)
        check_int("resample", resample, minimum=0, maximum=MAX_RESAMPLE)
        if num_langevin_steps is not None:
            check_int(
                "num_langevin_steps", num_langevin_steps, minimum=0, maximum=MAX_LANGEVIN_STEPS
            )
        if langevin_noise_scale is not None:
            check_number("langevin_noise_scale", langevin_noise_scale, minimum=0)
        check_number("guidance_scale", guidance_scale, minimum=0)
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if output_type == "pil" and len(self.sample_shape) == 1:
            raise ValueError(
                "output_type='pil': this model makes vectors, not images; use output_type='pt' or 'np'"
            )
        if image is None and mask_image is not None:
            raise ValueError("mask_image needs image (the images to complete)")
        if image is None and num_samples_per_image != 1:
            raise ValueError(
                "num_samples_per_image is for inpainting and needs image; use batch_size otherwise"
            )
        if class_labels is not None and compose is not None:
            raise ValueError(
                "class_labels and compose were both given; give one (a compose term "
                "((label,), 1.0) conditions on a class)"
            )
        check_image("image", image)
        check_image("mask_image", mask_image)
        dtype = next(self.ebm.parameters()).dtype
        if dtype != torch.float32:
            raise ValueError(
                f"the networks are {dtype} (torch_dtype / .to(dtype)); CDRLPipeline runs them in "
                "float32: reload in float32 and pass precision='bf16' for autocast"
            )

    def _compose_terms(self, compose, batch_size: int, device: torch.device) -> tuple:
        """The (labels (b, K), weight) terms of ``compose``, each checked for its shape and values."""
        if isinstance(compose, str | bytes | Tensor) or not isinstance(compose, Sequence):
            raise TypeError(
                f"compose must be a list of (labels, weight) pairs, got {type(compose).__name__}"
            )
        terms = []
        for i, term in enumerate(compose):
            if isinstance(term, str | bytes) or not isinstance(term, Sequence) or len(term) != 2:
                raise TypeError(f"compose[{i}] must be a (labels, weight) pair, got {term!r}")
            labels, weight = term
            if isinstance(labels, str | bytes) or not isinstance(labels, Sequence):
                raise TypeError(
                    f"compose[{i}] labels must be a list with one value (or None) per condition, "
                    f"got {labels!r}"
                )
            weight = check_number(f"compose[{i}] weight", weight)
            terms.append((self._condition(labels, batch_size, device, f"compose[{i}]"), weight))
        return tuple(terms)

    def calibrate(
        self, x0: Tensor, cond: Tensor, *, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """Fit the EBM's implicit-classifier offsets on labelled training data and store them in the
        scheduler config (saved by ``save_pretrained``); ``negation="posterior"`` needs them.

        Args:
            x0: (n, ...) training data in model units (data times ``data.scale``).
            cond: (n, K) their labels, one column per condition.
            generator: for the forward-diffusion noise.

        Returns:
            One (T, size_k) tensor per condition (``cdrl.calibration.fit_condition_offsets``).
        """
        from cdrl.calibration import fit_condition_offsets

        if not self.condition_sizes:
            raise ValueError("calibrate needs a conditional model; this model is unconditional")
        offsets = fit_condition_offsets(
            self.ebm,
            self.scheduler.schedule,
            self.scheduler.langevin_settings(),
            x0,
            cond,
            self.condition_sizes,
            generator=generator,
        )
        self.scheduler.register_to_config(condition_offsets=[o.tolist() for o in offsets])
        return offsets

    def _condition_offsets(self, device: torch.device) -> list[Tensor] | None:
        stored = self.scheduler.config.get("condition_offsets")
        if stored is None:
            return None
        offsets = [torch.tensor(o, dtype=torch.float32, device=device) for o in stored]
        expected = [(self.scheduler.schedule.num_levels, size) for size in self.condition_sizes]
        if [tuple(o.shape) for o in offsets] != expected:
            raise ValueError(
                f"the scheduler's condition_offsets have shapes {[tuple(o.shape) for o in offsets]}, but "
                f"this model needs {expected} (levels, values) per condition; re-run "
                "`cdrl-calibrate --checkpoint DIR`"
            )
        return offsets

    def _inpainting_inputs(
        self, image, mask_image, repeats: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """(known (b, c, h, w) in [-1, 1], known_mask (b, 1 or c, h, w), 1 = keep) from diffusers-style inputs."""
        if mask_image is None:
            raise ValueError(
                "inpainting needs mask_image as well as image (1 / white = repaint, 0 / black = keep)"
            )
        if len(self.sample_shape) != 3:
            raise ValueError("inpainting needs an image model; this model makes vectors")
        channels, size = self.sample_shape[0], self.sample_shape[1]
        known = (_to_tensor(image, channels).to(device) * 2 - 1) * self.scheduler.config.data_scale
        mask = _to_tensor(mask_image, 1 if _channels_of(mask_image) == 1 else channels).to(device)
        if known.shape[-2:] != (size, size) or mask.shape[-2:] != (size, size):
            raise ValueError(
                f"image {tuple(known.shape[-2:])} and mask {tuple(mask.shape[-2:])} must both be {size}x{size} for this model"
            )
        if mask.shape[0] not in (1, known.shape[0]):
            raise ValueError(f"got {known.shape[0]} images but {mask.shape[0]} masks")
        mask = mask.expand(known.shape[0], -1, -1, -1)
        known_mask = 1.0 - mask.round()
        return known.repeat_interleave(repeats, 0), known_mask.repeat_interleave(repeats, 0)

    def _null(self, batch_size: int, device: torch.device) -> Tensor:
        return null_condition(self.condition_sizes, batch_size, device)

    def _condition(
        self,
        labels: Sequence[int | None],
        batch_size: int,
        device: torch.device,
        name: str = "compose",
    ) -> Tensor:
        """One composition term's (b, K) labels; None entries stay null."""
        sizes = self.condition_sizes
        if not sizes:
            raise ValueError("compose needs a conditional model; this model is unconditional")
        if len(labels) != len(sizes):
            raise ValueError(
                f"{name}: each compose term needs {len(sizes)} labels (one per condition), got "
                f"{list(labels)}"
            )
        values = []
        for k, (value, size) in enumerate(zip(labels, sizes, strict=True)):
            if value is not None:
                check_int(f"{name} labels[{k}]", value, minimum=0)
                if not 0 <= int(value) < size:
                    raise ValueError(
                        f"{name}: condition {k} value {value} is outside [0, {size}) for this model"
                    )
            values.append(size if value is None else int(value))
        return torch.tensor(values, device=device).expand(batch_size, -1).clone()

    def _check_labels(self, class_labels: Sequence[int] | Tensor, device: torch.device) -> Tensor:
        if not self.condition_sizes:
            raise ValueError(
                "class_labels were given, but this model is unconditional (trained without labels)"
            )
        labels = check_labels("class_labels", class_labels).to(device)
        num_classes = self.condition_sizes[0]
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"class label {int(bad[0])} is outside [0, {num_classes}) for this model"
            )
        return labels

    def _postprocess(self, x: Tensor, output_type: str):
        """Samples in data units as ``output_type`` (checked by ``_check_arguments``)."""
        if x.dim() == 2:
            return x.cpu() if output_type == "pt" else x.cpu().numpy()
        bins = self.scheduler.config.get("num_bins")
        images = (((x if bins is None else requantize(x, bins)).clamp(-1, 1) + 1) / 2).cpu()
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).float().numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)


def _channels_of(images) -> int:
    if torch.is_tensor(images):
        return images.shape[-3] if images.dim() >= 3 else 1
    first = images[0] if isinstance(images, list | tuple) else images
    return len(first.getbands())


def _to_tensor(images, channels: int) -> Tensor:
    """PIL image(s) or a tensor in [0, 1] -> (n, channels, h, w) float32 in [0, 1]."""
    if torch.is_tensor(images):
        x = images.float()
        x = x.reshape(1, 1, *x.shape) if x.dim() == 2 else (x[None] if x.dim() == 3 else x)
        if x.shape[1] != channels:
            x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else x
        return x
    images = images if isinstance(images, list | tuple) else [images]
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in images]
    x = torch.from_numpy(np.stack(arrays))
    return x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)


__all__ = ["CDRLPipeline", "CDRLScheduler", "check_pipeline_weights", "weights_mismatch"]
