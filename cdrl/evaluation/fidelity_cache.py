"""A cache of torch-fidelity's features and FID statistics that runs no code when read.

torch-fidelity caches them as pickles (``<name>.pt``) and reads them back with
``torch.load(weights_only=False)``: a file planted in the cache folder would run code. While cdrl calls
it (``safe_fidelity_cache``), its two cache functions are replaced by ones that store safetensors
(``<name>.safetensors``) and read nothing else; a ``.pt`` file in the cache is never opened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity.metric_fid
import torch_fidelity.utils
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cdrl.utils import atomic_write, error_line

CACHE_SUFFIX = ".safetensors"


@contextlib.contextmanager
def safe_fidelity_cache() -> Iterator[None]:
    """Within the block, torch-fidelity's feature and statistics caches are safetensors files."""
    targets = [
        (torch_fidelity.utils, "cache_lookup_one_recompute_on_miss", _lookup_one),
        (torch_fidelity.metric_fid, "cache_lookup_one_recompute_on_miss", _lookup_one),
        (torch_fidelity.utils, "cache_lookup_group_recompute_all_on_any_miss", _lookup_group),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in targets]
    for module, name, replacement in targets:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _cache_path(name: str, kwargs: dict[str, Any]) -> Path | None:
    if not kwargs.get("cache", True) or kwargs.get("cache_root") is None:
        return None  # cdrl always passes its own cache_root when it caches
    return Path(kwargs["cache_root"]) / f"{name}{CACHE_SUFFIX}"


def _lookup_one(cached_filename: str, fn_recompute: Callable[[], Any], **kwargs) -> Any:
    path = _cache_path(cached_filename, kwargs)
    if path is None:
        return fn_recompute()
    if path.is_file():
        return _read_cached(path)
    item = fn_recompute()
    _write_cached(item, path)
    return item


def _lookup_group(prefix: str, item_names: list[str], fn_recompute: Callable, **kwargs) -> Any:
    paths = {name: _cache_path(prefix + name, kwargs) for name in item_names}
    if any(path is None for path in paths.values()):
        return fn_recompute()
    if all(path.is_file() for path in paths.values()):
        return {name: _read_cached(path) for name, path in paths.items()}
    items = fn_recompute()
    for name, path in paths.items():
        _write_cached(items[name], path)
    return items


def _write_cached(item: Any, path: Path) -> None:
    """A tensor, or a dict of NumPy arrays (FID's mu and sigma), as a safetensors file."""
    if torch.is_tensor(item):
        tensors, kind = {"tensor": item.detach().cpu().contiguous()}, "tensor"
    elif isinstance(item, dict) and all(isinstance(v, np.ndarray) for v in item.values()):
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in item.items()}
        kind = "numpy"
    else:
        return  # nothing else is cached: it is recomputed next time
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"kind": kind})


def _read_cached(path: Path) -> Any:
    try:
        with safe_open(str(path), framework="pt") as f:
            kind = (f.metadata() or {}).get("kind")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"cached features {path} are not a readable safetensors file ({error_line(err)}); delete "
            "it (or run with --no_cache)"
        ) from None
    if kind == "tensor" and set(tensors) == {"tensor"}:
        return tensors["tensor"]
    if kind == "numpy":
        return {key: value.numpy() for key, value in tensors.items()}
    raise ValueError(f"cached features {path} were not written by cdrl; delete it")
