"""Shared fixtures: tiny networks and pipelines built in code (no files, no downloads).

Every model fixture is seeded and returned in **eval mode**, so two forward passes give the same output
(in train mode spectral norm runs a power iteration per forward and moves its ``u``/``v`` buffers). Call
``.train()`` where a test needs training behaviour.

The tiny initializers are exactly as constructed, i.e. zero-initialized: their output equals their input.
Tests that need a non-trivial proposal mean call the ``randomize_output`` fixture on them.

No test writes outside its temporary folders: the whole session (and every process it starts) uses a
temporary ``$CDRL_CACHE_DIR``, where the default digits classifier is trained once per session
(``digits_classifier``, ``digits_classifier_path``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cdrl.models import EnergyMLP, EnergyResNet, InitializerMLP, InitializerUNet
from cdrl.pipeline import CDRLPipeline, CDRLScheduler

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
VECTOR_DIM = 2


def build_ebm(*, condition_sizes: tuple[int, ...] = (), seed: int = 0) -> EnergyResNet:
    torch.manual_seed(seed)
    return EnergyResNet(
        in_channels=1,
        sample_size=8,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        condition_sizes=condition_sizes,
    ).eval()


def build_initializer(*, condition_sizes: tuple[int, ...] = (), seed: int = 1) -> InitializerUNet:
    torch.manual_seed(seed)
    return InitializerUNet(
        in_channels=1,
        sample_size=8,
        block_out_channels=(16, 32),
        attention_levels=(False, True),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        condition_sizes=condition_sizes,
    ).eval()


def build_mlp_ebm(*, condition_sizes: tuple[int, ...] = (), seed: int = 2) -> EnergyMLP:
    torch.manual_seed(seed)
    return EnergyMLP(
        in_features=VECTOR_DIM,
        hidden=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        condition_sizes=condition_sizes,
    ).eval()


def build_mlp_initializer(
    *, condition_sizes: tuple[int, ...] = (), seed: int = 3
) -> InitializerMLP:
    torch.manual_seed(seed)
    return InitializerMLP(
        in_features=VECTOR_DIM,
        hidden=16,
        num_blocks=1,
        temb_dim=16,
        norm_num_groups=4,
        condition_sizes=condition_sizes,
    ).eval()


def _randomize_output(module: nn.Module, std: float = 0.05, seed: int = 123) -> nn.Module:
    """Give the zero-initialized output layers small random weights so mu(x) != x."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.abs().max() == 0:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return module


# ------------------------------------------------------------------ the cache


@pytest.fixture(scope="session", autouse=True)
def cdrl_cache_dir(tmp_path_factory) -> Path:
    """A temporary $CDRL_CACHE_DIR for the whole session, so that no test writes into ~/.cache/cdrl.

    Set in os.environ, so that processes the tests start (fresh_process, torchrun) inherit it; a test
    that needs its own cache sets the variable again with ``monkeypatch``.
    """
    path = tmp_path_factory.mktemp("cdrl_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDRL_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def digits_classifier_path(cdrl_cache_dir) -> Path:
    """The default digits classifier (default settings, seed 0), trained once per session into the
    session's temporary cache: ``$CDRL_CACHE_DIR/digits_classifier`` (about 15-30 s on 2 CPU cores)."""
    from cdrl.evaluation.digits import CACHE_SUBDIR, load_digits_classifier

    path = cdrl_cache_dir / CACHE_SUBDIR
    load_digits_classifier(path)  # trains and saves it (atomically) when missing
    return path


@pytest.fixture(scope="session")
def digits_classifier(digits_classifier_path):
    """The session's default digits classifier (eval mode), loaded from ``digits_classifier_path``.

    Shared by every test that uses it: do not change its weights or mode.
    """
    from cdrl.evaluation.digits import load_digits_classifier

    return load_digits_classifier(digits_classifier_path, train_if_missing=False)


@pytest.fixture
def classifier(digits_classifier):
    """The default digits classifier, trained once per session (a module may define its own)."""
    return digits_classifier


@pytest.fixture
def weights(digits_classifier_path) -> Path:
    """Its folder, in the session's temporary cache."""
    return digits_classifier_path


# ------------------------------------------------------------------ models


@pytest.fixture
def tiny_ebm() -> EnergyResNet:
    """Unconditional 8x8 one-channel EnergyResNet (16/32 channels, one block per resolution)."""
    return build_ebm()


@pytest.fixture
def tiny_cond_ebm() -> EnergyResNet:
    """The tiny EnergyResNet with one condition of NUM_CLASSES values (null label = NUM_CLASSES)."""
    return build_ebm(condition_sizes=(NUM_CLASSES,))


@pytest.fixture
def tiny_initializer() -> InitializerUNet:
    """Unconditional 8x8 one-channel InitializerUNet (zero-initialized output)."""
    return build_initializer()


@pytest.fixture
def tiny_cond_initializer() -> InitializerUNet:
    """The tiny InitializerUNet with one condition of NUM_CLASSES values."""
    return build_initializer(condition_sizes=(NUM_CLASSES,))


@pytest.fixture
def mlp_ebm() -> EnergyMLP:
    """Unconditional 2-D EnergyMLP."""
    return build_mlp_ebm()


@pytest.fixture
def mlp_cond_ebm() -> EnergyMLP:
    return build_mlp_ebm(condition_sizes=(NUM_CLASSES,))


@pytest.fixture
def mlp_initializer() -> InitializerMLP:
    """Unconditional 2-D InitializerMLP (zero-initialized output)."""
    return build_mlp_initializer()


@pytest.fixture
def mlp_cond_initializer() -> InitializerMLP:
    return build_mlp_initializer(condition_sizes=(NUM_CLASSES,))


@pytest.fixture
def randomize_output():
    """``randomize_output(module)``: fill the module's all-zero parameters with small random values."""
    return _randomize_output


# --------------------------------------------------------------- pipelines


@pytest.fixture
def tiny_scheduler() -> CDRLScheduler:
    """The CDRL schedule (T = 6) with K = 3 Langevin steps per level."""
    return CDRLScheduler(n_steps=3)


@pytest.fixture
def tiny_pipeline(tiny_ebm, tiny_initializer, tiny_scheduler) -> CDRLPipeline:
    """Unconditional image pipeline on the tiny EBM and initializer (CPU)."""
    pipe = CDRLPipeline(ebm=tiny_ebm, initializer=tiny_initializer, scheduler=tiny_scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_cond_pipeline(tiny_cond_ebm, tiny_cond_initializer, tiny_scheduler) -> CDRLPipeline:
    """Class-conditional image pipeline (NUM_CLASSES classes) on the tiny conditional networks."""
    pipe = CDRLPipeline(
        ebm=tiny_cond_ebm, initializer=tiny_cond_initializer, scheduler=tiny_scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def mlp_pipeline(mlp_ebm, mlp_initializer, tiny_scheduler) -> CDRLPipeline:
    """Unconditional vector (2-D) pipeline on the MLPs."""
    pipe = CDRLPipeline(ebm=mlp_ebm, initializer=mlp_initializer, scheduler=tiny_scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------- fresh processes


def _run_main(module: str, argv: list[str], out: str, err: str, memory_margin: int | None) -> None:
    """Child side of ``fresh_process``: stdout and stderr to files, an optional address-space limit
    (``memory_margin`` bytes above what the process already maps), then exit with ``main``'s code.

    ``module`` is "package.module" (its ``main``) or "package.module:function"."""
    import importlib
    import os
    import re
    import resource
    import sys

    torch.set_num_threads(1)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    module, _, function = module.partition(":")
    main = getattr(importlib.import_module(module), function or "main")
    if memory_margin is not None:
        with open("/proc/self/status") as status:
            mapped = int(re.search(r"VmSize:\s+(\d+) kB", status.read())[1]) * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_margin, hard))
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _noop() -> None:
    pass


class FreshProcess:
    """Runs a CLI's ``main`` in a new process forked from a server that has imported cdrl once, so that
    each run starts in milliseconds instead of the seconds that importing torch and diffusers take."""

    def __init__(self, context) -> None:
        self.context = context

    def start(self, module: str, argv, folder, *, memory_margin: int | None = None):
        """Start ``module.main(argv)``; stdout and stderr go to ``folder``/out.txt and err.txt."""
        from pathlib import Path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        args = (module, [str(a) for a in argv], str(folder / "out.txt"), str(folder / "err.txt"))
        process = self.context.Process(target=_run_main, args=(*args, memory_margin))
        process.start()
        return process

    def run(self, module: str, argv, folder, *, memory_margin: int | None = None, timeout=300):
        """``start``, then wait: (exit code, stdout, stderr)."""
        from pathlib import Path

        process = self.start(module, argv, folder, memory_margin=memory_margin)
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise TimeoutError(f"{module} {argv} did not finish in {timeout} s")
        folder = Path(folder)
        return process.exitcode, (folder / "out.txt").read_text(), (folder / "err.txt").read_text()


@pytest.fixture(scope="session")
def fresh_process() -> FreshProcess:
    """A ``FreshProcess`` runner (Linux/macOS forkserver; one OpenMP thread per process)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the forkserver start method")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["conftest", "cdrl.cli.train", "cdrl.cli.generate", "cdrl.cli.inpaint"]
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the server, and so every child, starts with these
        patch.setenv("MKL_NUM_THREADS", "1")
        warm = context.Process(target=_noop)
        warm.start()
        warm.join()
    return FreshProcess(context)


# ----------------------------------------------------------------------------------------------------------
# Training runs in-process (tests/test_train.py, tests/test_reliability.py).

DEBUG_CONFIG = Path(__file__).resolve().parents[1] / "configs/debug.yaml"


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state so every Accelerator starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_debug(output_dir: Path, *args: str) -> int:
    """cdrl.cli.train.main() on configs/debug.yaml into ``output_dir``; returns the exit code."""
    from cdrl.cli.train import main

    reset_accelerate()
    argv = [
        "--config",
        str(DEBUG_CONFIG),
        "--output_dir",
        str(output_dir),
        "--report_to",
        "none",
        *args,
    ]
    try:
        return main(argv)
    finally:
        reset_accelerate()


# ------------------------------------------------------------------ tolerances

# float32 results computed two ways (another batch size, thread count, build or reload) may round
# differently: each output is a sum of many float32 products, accumulated in another order. 1e-5 is
# about 80 float32 ulps (eps = 1.19e-7): enough for the reordered sums of these small networks, far
# below any difference a wrong formula makes. Bit-exact checks stay where the code promises them
# (the same batch, process and seed), with the reason beside them.
FLOAT32_RTOL = 1e-5


def assert_close_float32(actual, expected, *, magnitude: float | None = None) -> None:
    """Compare float32 results computed two ways, at a tolerance scaled to their magnitude.

    The absolute part is ``FLOAT32_RTOL`` times ``magnitude`` (default: the largest |expected|, at least
    1), so an energy of 1e4 may differ by 0.1 where one of 1 may differ by 1e-5. Works for float64
    tensors holding float32 results too (their default tolerance, 1e-7, is float64's).
    """
    expected = torch.as_tensor(expected)
    if magnitude is None:
        magnitude = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        torch.as_tensor(actual), expected, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * magnitude
    )


def assert_uint8_close(actual, expected, *, max_fraction: float = 0.01) -> None:
    """Compare 8-bit images (PNG pixels) whose float sources were computed two ways.

    A float32 value a hair from a rounding boundary (k + 0.5) / 255 may round to the other level on
    another batch size, thread count or build: allow a one-level difference on at most ``max_fraction``
    of the values (at least one value), and no larger difference anywhere.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.uint8
    diff = (actual.int() - expected.int()).abs()
    if diff.numel() == 0:
        return
    assert int(diff.max()) <= 1, f"values differ by up to {int(diff.max())} levels"
    allowed = max(1, int(max_fraction * diff.numel()))
    assert int((diff > 0).sum()) <= allowed, (
        f"{int((diff > 0).sum())} of {diff.numel()} values differ"
    )
