"""Sample quality through torch-fidelity: the offline digits feature extractor, the data sets it knows,
reference data, FID / KID / IS, and the seeded uint8 samples they score (split across processes).

Importing this module registers with torch-fidelity the feature extractor ``digits-classifier`` (the
penultimate features of ``cdrl.evaluation.digits.DigitsClassifier`` for FID and KID, its logits for the
Inception Score) and the data sets ``digits-train``, ``digits-test``, ``mnist5k-train`` and
``mnist5k-test``. Everything handed to torch-fidelity is a data set of (c, h, w) uint8 images.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch_fidelity
import torch_fidelity.metric_fid
import torch_fidelity.utils
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.defaults import DEFAULTS as FIDELITY_DEFAULTS
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor
from tqdm.auto import tqdm

from cdrl.config import DataConfig, load_config, to_dict
from cdrl.data import PIXEL_LEVELS, ImageFolderDataset, load_dataset
from cdrl.evaluation.digits import DigitsClassifier, digits_classifier_path, load_digits_classifier
from cdrl.evaluation.fidelity_cache import safe_fidelity_cache
from cdrl.generation import generate_samples
from cdrl.images import to_uint8
from cdrl.utils import DataError, error_line, git_sha

if TYPE_CHECKING:
    from accelerate import PartialState

    from cdrl.pipeline import CDRLPipeline

DIGITS_EXTRACTOR = "digits-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's standard (TF-compatible) InceptionV3
EXTRACTORS = {"digits": DIGITS_EXTRACTOR, "inception": INCEPTION_EXTRACTOR}
DIGITS_SHAPE = (1, 8, 8)
# torch-fidelity data sets served from cdrl.data: name -> (cfg.data.name, split)
PROJECT_DATASETS = {
    "digits-train": ("digits", "train"),
    "digits-test": ("digits", "test"),
    "mnist5k-train": ("mnist5k", "train"),
    "mnist5k-test": ("mnist5k", "test"),
}
CACHE_VERSION = 1  # part of every cache name: bump it when what a reference's features mean changes
KID_SUBSET_SIZE = FIDELITY_DEFAULTS["kid_subset_size"]  # 1000, lowered for smaller sets
ISC_SPLITS = FIDELITY_DEFAULTS["isc_splits"]  # 10, lowered for fewer samples
FIDELITY_KEYS = {  # torch-fidelity's result keys -> ours
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "isc_std",
}


class UInt8Images(Dataset):
    """A view of images as the (c, h, w) uint8 tensors torch-fidelity takes.

    Args:
        base: a (n, c, h, w) tensor, or a data set whose items are tensors or ``(x, ...)`` tuples; uint8
            images pass as they are, float images in [-1, 1] are rounded to uint8.
        channels: 3 repeats one-channel images to RGB (for Inception); None keeps the channels.
    """

    def __init__(self, base: Dataset | Tensor, *, channels: int | None = None) -> None:
        self.base = base
        self.channels = channels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Tensor:
        item = self.base[index]
        x = item[0] if isinstance(item, tuple | list) else item
        if x.dtype != torch.uint8:
            x = to_uint8(x[None])[0]
        if self.channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x.contiguous()


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's view of ``DigitsClassifier``: ``features`` (FID, KID) and ``logits`` (IS).

    Takes (b, 1, 8, 8) uint8 digits (RGB copies of them are averaged to one channel). The classifier is
    read from ``feature_extractor_weights_path`` (default ``$CDRL_CACHE_DIR/digits_classifier``) and
    trained there first, in about half a minute, when missing.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        self.classifier: DigitsClassifier = load_digits_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, *DIGITS_SHAPE, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"expected (b, 1 or 3, 8, 8) uint8 images, got {x.dtype} {tuple(x.shape)}"
            )
        if tuple(x.shape[2:]) != DIGITS_SHAPE[1:]:
            raise ValueError(f"the digits classifier takes 8x8 images, got {tuple(x.shape[2:])}")
        x = x.float().mean(dim=1, keepdim=True) / 127.5 - 1.0  # uint8 -> [-1, 1], RGB -> grey
        features, logits = self.classifier.features_and_logits(x)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


def _register() -> None:
    """Register the digits extractor and the project's data sets with torch-fidelity (once)."""
    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)
    for name, (data_name, split) in PROJECT_DATASETS.items():
        if name not in DATASETS_REGISTRY:
            # torch-fidelity calls fn(root, download); these sets live in cdrl.data and ignore both.
            torch_fidelity.register_dataset(
                name,
                lambda root, download, data_name=data_name, split=split: UInt8Images(
                    load_dataset(DataConfig(name=data_name), split=split)
                ),
            )


_register()


# ---------------------------------------------------------------- feature extractors


def extractor_fingerprint(extractor: str, weights_path: str | Path | None) -> str:
    """What distinguishes the extractor's features: its name and a hash of its weights.

    Args:
        extractor: a registered extractor name.
        weights_path: the weights file or folder (a folder: every file in it); None means
            torch-fidelity's own download (identified by its URL).
    """
    if weights_path is None:
        return f"{extractor}:{URL_INCEPTION_V3 if extractor == INCEPTION_EXTRACTOR else 'default'}"
    path = Path(weights_path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"{extractor}:sha256={digest.hexdigest()[:16]}"


def check_extractor(extractor: str, weights_path: str | Path | None) -> None:
    """Build the extractor once, so that missing or unusable weights fail before any sampling.

    Raises:
        DataError: the weights cannot be downloaded or loaded.
    """
    layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
    try:
        create_feature_extractor(
            extractor,
            [layer],
            cuda=False,
            verbose=False,
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        )
    # downloads fail as URLError, HTTPError, timeouts; files as OSError, ...
    except Exception as err:
        where = "downloaded" if weights_path is None else f"loaded from {weights_path}"
        hint = "; pass --inception_weights PATH (a local copy)" if weights_path is None else ""
        raise DataError(
            f"the {extractor} weights could not be {where} ({error_line(err, named=True)}){hint}"
        ) from None


# ---------------------------------------------------------------- reference data


@dataclass
class Reference:
    """Real data to compare samples with, and to score held-out likelihood and OOD detection on.

    Attributes:
        spec: the name it was asked for (a registered data set, an image folder, or a config).
        kind: "registered", "folder", "config", or "tensor" (in memory, see ``from_images``).
        dataset: its items, as the source gives them: (c, h, w) uint8 images, or ``(x, cond)`` in data units.
        sample_shape: one item's shape, (c, h, w) or (d,).
        identity: what the data are (for cache names): the name, or a digest of the config / files.
        num_bins: levels per pixel of the source (256 for 8-bit images, 17 for the digits), None for
            continuous data (the 2-D toys); bits/dim dequantizes with it.
    """

    spec: str
    kind: Literal["registered", "folder", "config", "tensor"]
    dataset: Dataset
    sample_shape: tuple[int, ...]
    identity: str
    num_bins: int | None = 256

    @classmethod
    def from_images(cls, spec: str, images: Tensor) -> Reference:
        """A reference held in memory: (n, c, h, w) uint8 images, identified by a hash of their bytes."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected (n, c, h, w) uint8 images, got {images.dtype} {tuple(images.shape)}"
            )
        digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]
        identity = f"tensor:{digest}:{tuple(images.shape)}"
        return cls(spec, "tensor", images, tuple(images.shape[1:]), identity)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3

    def images(self, *, channels: int | None = None) -> UInt8Images:
        """The data as torch-fidelity input: (c, h, w) uint8 items."""
        return UInt8Images(self.dataset, channels=channels)

    def data(self, indices: list[int] | None = None) -> Tensor:
        """(n, ...) float32 in data units (images in [-1, 1]), all items or those at ``indices``."""
        indices = range(len(self)) if indices is None else indices
        items = []
        for index in indices:
            item = self.dataset[index]
            x = item[0] if isinstance(item, tuple | list) else item
            items.append(x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float())
        return torch.stack(items) if items else torch.zeros(0, *self.sample_shape)

    def cache_name(self, extractor_id: str) -> str:
        """torch-fidelity's cache entry for this data under one extractor (its features and statistics)."""
        key = json.dumps([CACHE_VERSION, self.identity, extractor_id])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.spec).strip("_.")[-40:] or "data"
        return f"cdrl-{slug}-{digest}"

    def describe(self) -> dict[str, Any]:
        """JSON-ready: the spec, its kind, the number of items and their shape."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "size": len(self),
            "shape": list(self.sample_shape),
            "num_bins": self.num_bins,
        }


def reference_choices() -> str:
    """The registered data set names, for error messages and --help."""
    return ", ".join(sorted(DATASETS_REGISTRY))


def load_reference(
    spec: str, *, sample_shape: tuple[int, ...], data_dir: str | Path | None = None
) -> Reference:
    """Resolve a reference given on the command line, and check it fits the model's samples.

    Args:
        spec: a data set registered with torch-fidelity (``cifar10-train``, ``digits-test``, ...); a folder
            of images (read with the model's channels, resized and center-cropped to its size when they
            differ); or a config file ``path.yaml`` with an optional ``:train`` / ``:test`` split (default
            train), whose ``data`` section names the data set.
        sample_shape: the model's sample shape, (c, h, w) or (d,).
        data_dir: the root of torch-fidelity's registered data sets (default: torch-fidelity's, with
            downloading allowed; given: a local copy, no download).

    Raises:
        DataError: an unknown spec, data that cannot be read, or data of another shape.
    """
    config_path, split = _config_spec(spec)
    if spec in PROJECT_DATASETS:  # straight from cdrl.data, so that data() gives the exact values
        data_name, split = PROJECT_DATASETS[spec]
        dataset = load_dataset(DataConfig(name=data_name), split=split)
        levels = PIXEL_LEVELS.get(data_name, 256)
        reference = Reference(spec, "registered", dataset, (), f"registered:{spec}", levels)
    elif spec in DATASETS_REGISTRY:
        root = Path(data_dir) if data_dir is not None else _fidelity_datasets_root()
        try:  # torchvision makes the root when it downloads
            dataset = DATASETS_REGISTRY[spec](str(root), data_dir is None)
        except DataError:
            raise
        # torchvision: RuntimeError when missing, URLError when offline, ...
        except Exception as err:
            hint = (
                f"check that {root} holds it"
                if data_dir is not None
                else "check the network, or pass --data_dir with a local copy"
            )
            raise DataError(
                f"reference {spec!r} could not be loaded ({error_line(err, named=True)}); {hint}"
            ) from None
        reference = Reference(spec, "registered", dataset, (), f"registered:{spec}")
    elif config_path is not None:
        cfg = load_config(config_path)
        cfg.data.random_flip = cfg.data.dequantize = False  # reference data as they are
        dataset = load_dataset(cfg.data, split=split)
        identity = json.dumps({"data": to_dict(cfg.data), "split": split}, sort_keys=True)
        if cfg.data.name == "folder":
            identity += _folder_listing(Path(cfg.data.data_dir))
        levels = PIXEL_LEVELS.get(cfg.data.name, 256) if dataset.is_image else None
        reference = Reference(spec, "config", dataset, (), f"config:{identity}", levels)
    elif Path(spec).is_dir():
        if len(sample_shape) != 3:
            raise DataError(f"reference folder {spec}: this model makes vectors, not images")
        channels, size = sample_shape[0], sample_shape[-1]
        dataset = ImageFolderDataset(spec, image_size=size, channels=channels)
        identity = json.dumps({"channels": channels, "size": size}) + _folder_listing(Path(spec))
        reference = Reference(spec, "folder", dataset, (), f"folder:{identity}")
    elif os.sep in spec or Path(spec).exists():
        raise DataError(f"reference {spec} is neither a folder of images nor a config file (.yaml)")
    else:
        raise DataError(
            f"unknown reference {spec!r}: give a registered data set ({reference_choices()}), "
            "a folder of images, or a config file (configs/NAME.yaml, optionally :train or :test)"
        )
    if len(reference) == 0:
        raise DataError(f"reference {spec!r} holds no data")
    first = reference.dataset[0]
    reference.sample_shape = tuple((first[0] if isinstance(first, tuple | list) else first).shape)
    if reference.sample_shape != tuple(sample_shape):
        raise DataError(
            f"reference {spec!r} holds {_shape(reference.sample_shape)} data, but the model makes "
            f"{_shape(sample_shape)} samples"
        )
    return reference


def _config_spec(spec: str) -> tuple[Path | None, Literal["train", "test"]]:
    """(config path, split) for 'path.yaml[:train|:test]', or (None, 'train') for anything else."""
    path, _, split = spec.rpartition(":")
    if split not in ("train", "test") or not path:
        path, split = spec, "train"
    if Path(path).suffix.lower() not in (".yaml", ".yml"):
        return None, "train"
    if not Path(path).is_file():
        raise DataError(f"reference config {path} does not exist")
    return Path(path), split


def training_split(spec: str) -> str | None:
    """The spec of the training split of the data ``spec`` names, or None when it has none (a folder).

    'digits-test' -> 'digits-train', 'cifar10-val' -> 'cifar10-train', 'configs/x.yaml[:test]' ->
    'configs/x.yaml:train'; a training split is its own.
    """
    config_path, _ = _config_spec(spec)
    if config_path is not None:
        return f"{config_path}:train"
    if spec in DATASETS_REGISTRY:
        train = f"{spec.rpartition('-')[0]}-train"
        return train if train in DATASETS_REGISTRY else None
    return None


def _folder_listing(root: Path) -> str:
    """A digest of a folder's files (relative paths, sizes, modification times)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return f"files:{digest.hexdigest()[:16]}"


def _fidelity_datasets_root() -> Path:
    """torch-fidelity's default data set root: $TORCH_HOME/fidelity_datasets (its own choice, copied)."""
    return Path(torch.hub._get_torch_home()) / "fidelity_datasets"


def _shape(shape: tuple[int, ...]) -> str:
    if len(shape) == 3:
        return f"{shape[0]}x{shape[1]}x{shape[2]} (channels x height x width)"
    return f"{shape[0]}-d"


def subset_indices(n: int, limit: int | None, seed: int) -> list[int] | None:
    """A seeded random subset of ``limit`` of ``range(n)`` (sorted), or None for all."""
    if limit is None or limit >= n:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:limit].tolist())


# ---------------------------------------------------------------- metrics


def compute_fidelity(
    samples: Tensor,
    reference: Reference | None,
    *,
    metrics: set[str],
    extractor: str,
    weights_path: str | Path | None = None,
    batch_size: int = 64,
    cuda: bool = False,
    cache_root: str | Path | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """FID, KID and Inception Score of uint8 samples with torch-fidelity's ``calculate_metrics``.

    Args:
        samples: (n, c, h, w) uint8 generated images.
        reference: the real data; needed for "fid" and "kid".
        metrics: a subset of {"fid", "kid", "isc"}.
        extractor: a registered feature extractor (``EXTRACTORS``' values).
        weights_path: its weights (Inception: a local ``.pth``; digits: the classifier folder); None
            means the default (Inception: torch-fidelity's download; digits: the cached classifier,
            trained first if missing).
        batch_size: images per feature-extractor forward.
        cuda: run the extractor on the current CUDA device.
        cache_root: where torch-fidelity caches the reference's features and statistics; None: no cache.

    Returns:
        ``(figures, settings)``: ``fid``, ``kid_mean``, ``kid_std``, ``isc_mean``, ``isc_std`` as asked; and
        what was used (feature layers, KID subsets, IS splits, the reference's cache name).
    """
    unknown = metrics - {"fid", "kid", "isc"}
    if unknown or not metrics:
        raise ValueError(
            f"metrics must be a non-empty subset of fid, kid, isc; got {sorted(metrics)}"
        )
    paired = metrics & {"fid", "kid"}
    if paired and reference is None:
        raise ValueError(f"{' and '.join(sorted(paired))} need reference data")
    if len(samples) < 2 or (paired and len(reference) < 2):
        raise ValueError("FID, KID and IS need at least 2 samples and 2 reference images")
    if extractor == DIGITS_EXTRACTOR:  # resolve the default, so the cache name hashes its weights
        weights_path = digits_classifier_path(weights_path)
    channels = 3 if extractor == INCEPTION_EXTRACTOR else None
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    kwargs: dict[str, Any] = {
        "input1": UInt8Images(samples, channels=channels),
        "fid": "fid" in metrics,
        "kid": "kid" in metrics,
        "isc": "isc" in metrics,
        "feature_extractor": extractor,
        "feature_extractor_weights_path": None if weights_path is None else str(weights_path),
        "batch_size": batch_size,
        "cuda": cuda,
        "cache": cache_root is not None,
        "verbose": False,
        "save_cpu_ram": True,  # no DataLoader worker processes: the images are in memory or small
    }
    if cache_root is not None:
        kwargs["cache_root"] = str(cache_root)
    settings: dict[str, Any] = {
        "feature_extractor": extractor,
        "feature_layers": {m: cls.get_default_feature_layer_for_metric(m) for m in sorted(metrics)},
        "rng_seed": FIDELITY_DEFAULTS["rng_seed"],
    }
    if paired:
        cache_name = reference.cache_name(extractor_fingerprint(extractor, weights_path))
        kwargs.update(input2=reference.images(channels=channels), input2_cache_name=cache_name)
        settings["reference_cache_name"] = cache_name if cache_root is not None else None
    if "kid" in metrics:
        kwargs["kid_subset_size"] = min(KID_SUBSET_SIZE, len(samples), len(reference))
        settings.update(
            kid_subsets=FIDELITY_DEFAULTS["kid_subsets"], kid_subset_size=kwargs["kid_subset_size"]
        )
    if "isc" in metrics:
        kwargs["isc_splits"] = min(ISC_SPLITS, len(samples))
        settings["isc_splits"] = kwargs["isc_splits"]
    if cache_root is not None:
        os.makedirs(cache_root, exist_ok=True)
    with safe_fidelity_cache():
        raw = torch_fidelity.calculate_metrics(**kwargs)
    figures = {ours: float(raw[key]) for key, ours in FIDELITY_KEYS.items() if key in raw}
    return figures, settings


# ---------------------------------------------------------------- generated samples, versions


def sample_images(
    pipe: CDRLPipeline,
    labels: Sequence[int] | None,
    seeds: Sequence[int],
    *,
    guidance_scale: float = 1.0,
    num_langevin_steps: int | None = None,
    batch_size: int = 256,
    state: PartialState | None = None,
) -> Tensor | None:
    """Generate samples as uint8 images, split across the processes of ``state``.

    Each process generates a contiguous share of ``seeds`` (accelerate's ``split_between_processes``);
    the shares are gathered, in order, on the main process.

    Args:
        pipe: a ``CDRLPipeline`` on this process's device.
        labels: one class label per sample, or None.
        seeds: one seed per sample (see ``cdrl.generation.generate_samples``).
        guidance_scale: classifier-free guidance (1 = off).
        num_langevin_steps: K per level (default: the trained value).
        batch_size: samples per pipeline call.
        state: accelerate's ``PartialState``; None: this process makes every sample.

    Returns:
        (n, c, h, w) uint8 on the CPU on the main process; None on the others.
    """
    indices = list(range(len(seeds)))
    main = state is None or state.is_main_process
    with (
        state.split_between_processes(indices) if state is not None else nullcontext(indices)
    ) as mine:
        chunks = []
        starts = range(0, len(mine), batch_size)
        for start in tqdm(
            starts, desc="sampling", unit="batch", disable=not main or len(starts) < 2
        ):
            part = mine[start : start + batch_size]
            x = generate_samples(
                pipe,
                None if labels is None else [labels[i] for i in part],
                [seeds[i] for i in part],
                guidance_scale=guidance_scale,
                num_langevin_steps=num_langevin_steps,
                batch_size=batch_size,
                progress=False,
            )
            chunks.append(to_uint8(x))
        local = (
            torch.cat(chunks) if chunks else torch.zeros(0, *pipe.sample_shape, dtype=torch.uint8)
        )
    if state is None or state.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    shares = gather_object([local])  # one tensor per process, in process order
    return torch.cat(shares) if main else None


def versions() -> dict[str, str]:
    """The versions of everything that shapes the figures."""
    import accelerate
    import diffusers
    import numpy
    import torch_fidelity
    import torchvision

    import cdrl

    return {
        "cdrl": cdrl.__version__,
        "git": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_fidelity": torch_fidelity.__version__,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "numpy": numpy.__version__,
    }
