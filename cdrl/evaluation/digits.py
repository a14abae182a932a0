"""An independent CNN classifier of scikit-learn's 8x8 digits, trained on real data only.

Used to judge generated digits (confidence, class balance, novelty) and as a digits feature extractor.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn
from tqdm.auto import tqdm

from cdrl import data
from cdrl.utils import atomic_write

NUM_CLASSES = 10
DEFAULT_EPOCHS = 20
CACHE_ENV_VAR = "CDRL_CACHE_DIR"
CACHE_SUBDIR = "digits_classifier"

# judge_digits targets
MIN_CONFIDENT_FRACTION = 0.85
MAX_CLASS_FRACTION = 0.20


def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The project's train/test split of the digits (``cdrl.data.digits_split``), in its split order.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: x (1437, 1, 8, 8) and (360, 1, 8, 8) float32 in [-1, 1],
        y (1437,) and (360,) int64 labels in [0, 9].
    """
    images, labels, train_index, test_index = data.digits_split()
    x, y = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
    train, test = torch.from_numpy(train_index), torch.from_numpy(test_index)
    return x[train], y[train], x[test], y[test]


class DigitsClassifier(ModelMixin, ConfigMixin):
    """A small CNN for (b, 1, 8, 8) digits in [-1, 1].

    conv3x3 32 -> conv3x3 64 -> 2x2 max pool -> conv3x3 128 -> flatten (128 * 4 * 4) -> Linear to
    ``feature_dim`` -> ReLU (the features) -> dropout -> Linear to ``num_classes`` (the logits).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        sample_size: int = 8,
        num_classes: int = NUM_CLASSES,
        channels: tuple[int, ...] = (32, 64, 128),
        feature_dim: int = 128,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3 * (sample_size // 2) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations.

        Args:
            x: (b, 1, 8, 8) images in [-1, 1].

        Returns:
            (b, feature_dim) non-negative features (after the ReLU, before dropout).
        """
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h)).flatten(1)
        return F.relu(self.fc(h))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Penultimate features and class logits from one pass (the digits FID/KID and IS inputs).

        Args:
            x: (b, 1, 8, 8) images in [-1, 1].

        Returns:
            (b, feature_dim) features (as ``features``) and (b, num_classes) logits (as ``forward``).
        """
        features = self.features(x)
        return features, self.head(self.drop(features))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits.

        Args:
            x: (b, 1, 8, 8) images in [-1, 1].

        Returns:
            (b, num_classes) logits.
        """
        return self.features_and_logits(x)[1]

    def probabilities(self, x: Tensor) -> Tensor:
        """Class probabilities (softmax of the logits).

        Args:
            x: (b, 1, 8, 8) images in [-1, 1].

        Returns:
            (b, num_classes) probabilities summing to 1 over classes.
        """
        return self(x).softmax(dim=1)


def augment_digits(
    x: Tensor,
    generator: torch.Generator,
    *,
    max_shift: int = 1,
    max_rotation_deg: float = 10.0,
    max_scale: float = 0.1,
    noise_std: float = 0.1,
) -> Tensor:
    """Random small affine jitter plus Gaussian pixel noise, mimicking generated-sample defects.

    Per sample: an integer shift in [-max_shift, max_shift] pixels on each axis, a rotation in
    +-max_rotation_deg, a scale in 1 +- max_scale (bilinear, background -1), then Gaussian noise with a
    standard deviation drawn uniformly from [0, noise_std], clamped to [-1, 1].

    Args:
        x: (b, 1, h, w) images in [-1, 1].
        generator: CPU generator all randomness is drawn from.

    Returns:
        (b, 1, h, w) augmented images in [-1, 1].
    """
    b, _, h, w = x.shape

    def uniform(*shape: int) -> Tensor:
        return (torch.rand(shape, generator=generator) * 2 - 1).to(x.device, x.dtype)

    angle = uniform(b) * math.radians(max_rotation_deg)
    scale = 1 + uniform(b) * max_scale
    shift = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator).to(
        x.device, x.dtype
    )
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, shift[:, 0] * 2 / w], dim=1),
            torch.stack([sin, cos, shift[:, 1] * 2 / h], dim=1),
        ],
        dim=1,
    )  # (b, 2, 3), output -> input coordinates
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    sigma = torch.rand(b, 1, 1, 1, generator=generator).to(x.device, x.dtype) * noise_std
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    return (x + sigma * noise).clamp(-1, 1)


@torch.no_grad()
def predict_probabilities(
    classifier: DigitsClassifier, images: Tensor, *, batch_size: int = 1024
) -> Tensor:
    """Class probabilities in eval mode, batched, on the classifier's device.

    Args:
        classifier: a trained ``DigitsClassifier``.
        images: (n, 1, 8, 8) in [-1, 1].

    Returns:
        (n, 10) float32 probabilities on the CPU.
    """
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    out = [
        classifier.probabilities(chunk.to(device, torch.float32)).cpu()
        for chunk in images.split(batch_size)
    ]
    classifier.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, classifier.config.num_classes)


def evaluate_accuracy(classifier: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy.

    Args:
        classifier: a trained ``DigitsClassifier``.
        images: (n, 1, 8, 8) in [-1, 1].
        labels: (n,) int labels.

    Returns:
        The fraction of argmax predictions equal to ``labels``.
    """
    preds = predict_probabilities(classifier, images).argmax(dim=1)
    return (preds == labels.cpu()).float().mean().item()


@torch.no_grad()
def digits_accuracy(
    samples: Tensor, labels: list[int] | Tensor, classifier: DigitsClassifier
) -> dict[str, Any]:
    """How often the digits classifier reads a conditional sample as the class it was asked for.

    Args:
        samples: (n, 1, 8, 8) uint8 generated digits.
        labels: (n,) the requested classes.
        classifier: a trained ``DigitsClassifier``.

    Returns:
        ``accuracy`` (overall) and ``per_class`` ({class: accuracy} over the requested classes).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    predicted = predict_probabilities(classifier, samples.float() / 127.5 - 1.0).argmax(dim=1)
    correct = (predicted == labels).double()
    per_class = {int(c): correct[labels == c].mean().item() for c in labels.unique()}
    return {"accuracy": correct.mean().item(), "per_class": per_class}


@contextlib.contextmanager
def _torch_threads(num_threads: int) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_digits_classifier(
    *,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 128,
    lr: float = 3e-3,
    outlier_weight: float = 0.5,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> DigitsClassifier:
    """Train a ``DigitsClassifier`` on the train split of ``digits_split()``, deterministically.

    Each step: cross-entropy on ``augment_digits`` of a minibatch, plus ``outlier_weight`` times the
    cross-entropy to the uniform distribution on half as many uniform-noise images (outlier exposure,
    so that garbage is not classified confidently). Adam with a cosine learning-rate decay.

    Initialization and dropout use a forked, seeded global RNG (the caller's RNG state is untouched);
    shuffling, augmentation and noise use a seeded CPU generator. On the CPU it trains on one thread
    (restored afterwards): faster for so small a network, and the weights do not depend on the core count.

    Args:
        seed: the seed of every random choice.
        epochs: passes over the 1437 training digits.
        batch_size: minibatch size.
        lr: the peak learning rate.
        outlier_weight: weight of the outlier-exposure term; 0 turns it off.
        device: where to train.
        progress: a progress bar over the epochs on stderr.

    Returns:
        The trained classifier, in eval mode.
    """
    device = torch.device(device)
    x_train, y_train, _, _ = digits_split()
    x_train, y_train = x_train.to(device), y_train.to(device)
    n = x_train.shape[0]
    total_steps = max(1, epochs * math.ceil(n / batch_size))
    threads = _torch_threads(1) if device.type == "cpu" else contextlib.nullcontext()
    with threads, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = DigitsClassifier().to(device)
        generator = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
        model.train()
        for _ in tqdm(range(epochs), desc="digits classifier", unit="epoch", disable=not progress):
            order = torch.randperm(n, generator=generator).to(device)
            for idx in order.split(batch_size):
                b = idx.numel()
                x = augment_digits(x_train[idx], generator)
                if outlier_weight > 0:
                    noise = torch.rand((max(1, b // 2), *x.shape[1:]), generator=generator)
                    x = torch.cat([x, noise.to(device) * 2 - 1])
                logits = model(x)
                loss = F.cross_entropy(logits[:b], y_train[idx])
                if outlier_weight > 0:
                    loss = loss - outlier_weight * F.log_softmax(logits[b:], dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def cache_root() -> Path:
    """The project's cache folder: ``$CDRL_CACHE_DIR``, or ``~/.cache/cdrl`` when that is unset."""
    return Path(os.environ.get(CACHE_ENV_VAR) or "~/.cache/cdrl").expanduser()


def default_classifier_path() -> Path:
    """``$CDRL_CACHE_DIR/digits_classifier``, with the cache root defaulting to ``~/.cache/cdrl``."""
    return cache_root() / CACHE_SUBDIR


def save_classifier_atomically(
    classifier: DigitsClassifier, path: str | Path, *, overwrite: bool = False
) -> Path:
    """``save_pretrained`` into a temporary sibling directory, then rename it to ``path``.

    Without ``overwrite``, an existing classifier at ``path`` (say another process won the race) is
    kept and the new copy discarded; with it, the new one replaces the old all at once (``atomic_write``).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    if not overwrite and (path / "config.json").is_file():
        return path
    with atomic_write(path, folder=True) as tmp:
        classifier.save_pretrained(tmp, safe_serialization=True)
    return path


def load_digits_classifier(
    path: str | Path | None = None, *, train_if_missing: bool = True
) -> DigitsClassifier:
    """Load the classifier saved at ``path``, training and saving it first if it is missing.

    Args:
        path: a ``save_pretrained`` directory; default ``default_classifier_path()``.
        train_if_missing: train with the defaults (seed 0, on the CPU) and save atomically when
            ``path`` holds no classifier; otherwise raise.

    Returns:
        The classifier, in eval mode.

    Raises:
        FileNotFoundError: ``path`` holds no classifier and ``train_if_missing`` is False.
    """
    path = Path(path).expanduser() if path is not None else default_classifier_path()
    if not (path / "config.json").is_file():
        if not train_if_missing:
            raise FileNotFoundError(
                f"no digits classifier at {path}; create it with: "
                f"python -m cdrl.evaluation.digits --output {path}"
            )
        print(
            f"no digits classifier at {path}: training one on the digits training split "
            f"(once; {DEFAULT_EPOCHS} epochs, about 10-30 s on a CPU)",
            file=sys.stderr,
        )
        start = time.perf_counter()
        save_classifier_atomically(train_digits_classifier(progress=True), path)
        print(
            f"trained the digits classifier in {time.perf_counter() - start:.0f} s", file=sys.stderr
        )
    return DigitsClassifier.from_pretrained(path).eval()


def digits_classifier_path(path: str | Path | None = None) -> Path:
    """The digits classifier's folder (default ``$CDRL_CACHE_DIR/digits_classifier``), trained first if missing."""
    path = Path(path).expanduser() if path is not None else default_classifier_path()
    load_digits_classifier(path)  # trains and saves it (atomically) when missing
    return path


def judge_digits(
    images: Tensor, classifier: DigitsClassifier, *, confidence: float = 0.9
) -> dict[str, float | int | bool | list[float]]:
    """Judge generated digits by an independent classifier's confidence and class balance.

    Targets: ``confident_fraction >= 0.85``, all 10 classes present (each with at least one confident
    sample), and no class above 20% of the argmax predictions.

    Args:
        images: (n, 1, 8, 8) in [-1, 1].
        classifier: a trained ``DigitsClassifier``.
        confidence: the max-probability threshold of a confident classification.

    Returns:
        A JSON-serializable dict: ``num_samples``, ``confidence``, ``confident_fraction`` (max prob >=
        ``confidence``), ``class_histogram`` (10 fractions of argmax predictions over all samples),
        ``classes_present`` (classes with at least one confident sample), ``max_class_fraction``,
        ``mean_max_probability`` and ``passes``.
    """
    probs = predict_probabilities(classifier, images)
    num_classes = probs.shape[1]
    n = probs.shape[0]
    max_prob, pred = probs.max(dim=1) if n else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    confident = max_prob >= confidence
    histogram = torch.bincount(pred, minlength=num_classes).double() / max(n, 1)
    confident_fraction = confident.double().mean().item() if n else 0.0
    classes_present = int(torch.unique(pred[confident]).numel())
    max_class_fraction = histogram.max().item()
    passes = (
        n > 0
        and confident_fraction >= MIN_CONFIDENT_FRACTION
        and classes_present == num_classes
        and max_class_fraction <= MAX_CLASS_FRACTION
    )
    return {
        "num_samples": n,
        "confidence": confidence,
        "confident_fraction": confident_fraction,
        "class_histogram": histogram.tolist(),
        "classes_present": classes_present,
        "max_class_fraction": max_class_fraction,
        "mean_max_probability": max_prob.double().mean().item() if n else 0.0,
        "passes": bool(passes),
    }


def nearest_neighbour_distances(queries: Tensor, reference: Tensor, *, chunk: int = 1024) -> Tensor:
    """L2 distance from each query to its nearest reference, in flattened pixel space.

    Args:
        queries: (n, ...) images.
        reference: (m, ...) images of the same per-sample shape.

    Returns:
        (n,) float64 distances.
    """
    ref = reference.reshape(reference.shape[0], -1).double().cpu()
    out = [
        torch.cdist(q.reshape(q.shape[0], -1).double().cpu(), ref).min(dim=1).values
        for q in queries.split(chunk)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def novelty(
    images: Tensor,
    train: Tensor,
    *,
    reference: Tensor | None = None,
    copy_percentile: float = 1.0,
) -> dict[str, float | int]:
    """How far generated digits are from the training set, against real unseen digits.

    A sample is a "copy" when its nearest-neighbour distance to ``train`` is below the
    ``copy_percentile``-th percentile of the reference-to-train nearest-neighbour distances (by default
    the reference is the test split of ``digits_split()``, real digits the model never saw).

    Args:
        images: (n, 1, 8, 8) generated images in [-1, 1].
        train: (m, 1, 8, 8) training images in [-1, 1].
        reference: (k, 1, 8, 8) held-out real images in [-1, 1]; default the test split.
        copy_percentile: the percentile (0-100) of reference distances below which a sample is a copy.

    Returns:
        A JSON-serializable dict: ``num_samples``, ``nn_distance_mean``, ``nn_distance_median``,
        ``copy_fraction``, ``copy_threshold`` (the reference percentile), ``copy_percentile``,
        ``reference_nn_distance_median`` and ``reference_nn_distance_mean``.
    """
    if reference is None:
        reference = digits_split()[2]
    ref_dist = nearest_neighbour_distances(reference, train)
    threshold = torch.quantile(ref_dist, copy_percentile / 100.0).item()
    dist = nearest_neighbour_distances(images, train)
    n = dist.numel()
    return {
        "num_samples": n,
        "nn_distance_mean": dist.mean().item() if n else float("nan"),
        "nn_distance_median": dist.median().item() if n else float("nan"),
        "copy_fraction": (dist < threshold).double().mean().item() if n else 0.0,
        "copy_threshold": threshold,
        "copy_percentile": copy_percentile,
        "reference_nn_distance_median": ref_dist.median().item(),
        "reference_nn_distance_mean": ref_dist.mean().item(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train the classifier, save it with ``save_pretrained``, print the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="directory to save the classifier into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    classifier = train_digits_classifier(
        seed=args.seed, epochs=args.epochs, device=args.device, progress=True
    )
    seconds = time.perf_counter() - start
    _, _, x_test, y_test = digits_split()
    accuracy = evaluate_accuracy(classifier, x_test, y_test)
    path = save_classifier_atomically(classifier, Path(args.output).expanduser(), overwrite=True)
    print(f"trained in {seconds:.1f} s; test accuracy {accuracy:.4f}; saved to {path}")


if __name__ == "__main__":
    main()
