"""The GPU path's settings (cdrl.precision), checked against float32 on CPU.

Tolerances (bf16 keeps 8 bits of mantissa, a relative rounding of 2^-9 = 0.2% per op, which accumulates
over the network's depth):
- energies: |E_bf16 - E_fp32| <= 3e-2 * max |E_fp32| (seen: <= 1.7e-2);
- grad_y: cosine similarity >= 0.99 and relative L2 error <= 0.15 (seen: >= 0.997 and <= 0.07);
- 15 Langevin steps with the same noise: ||y_bf16 - y_fp32|| <= 5e-2 * ||y_fp32 - y_start|| (seen:
  <= 1.5e-2), and the state stays float32;
- whole samples (T = 6, K = 3, Tweedie): max |x_bf16 - x_fp32| <= 5e-2 * max |x_fp32|;
- channels-last and folded spectral norm: the same energies within 1e-5 (relative to max |E|).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_float32, build_ebm, build_initializer
from torch.nn.utils import parametrize

from cdrl import precision
from cdrl.langevin import langevin_refine
from cdrl.models import EnergyResNet
from cdrl.pipeline import CDRLScheduler
from cdrl.sampling import energy_fn, frozen, level, sample

BF16 = torch.bfloat16


def rgb_ebm(seed: int = 0) -> EnergyResNet:
    """A tiny 3-channel EBM (spectral norm on), so NHWC differs from NCHW in memory."""
    torch.manual_seed(seed)
    return EnergyResNet(
        in_channels=3, sample_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1
    ).eval()


def chain_setup(t: int, b: int = 32, shape=(1, 8, 8), seed: int = 0):
    """Level constants of ``t`` and a noisy x_{t+1} from q, x_0 ~ U[-1, 1]."""
    scheduler = CDRLScheduler(n_steps=15)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, *shape, generator=gen) * 2 - 1
    t_batch = torch.full((b,), t)
    _, x_next = scheduler.schedule.q_pair(x0, t_batch, generator=gen)
    return level(scheduler.schedule, t_batch, scheduler.langevin_settings()), x_next


def energy_and_grad(fn, y):
    leaf = y.detach().requires_grad_(True)
    energy = fn(leaf)
    (grad,) = torch.autograd.grad(energy.sum(), leaf)
    return energy.detach(), grad


# ------------------------------------------------------------------ precision names and contexts


def test_autocast_dtype_names():
    assert precision.autocast_dtype("no") is None
    assert precision.autocast_dtype("fp32") is None
    assert precision.autocast_dtype("bf16") is torch.bfloat16
    assert precision.autocast_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="bf16"):
        precision.autocast_dtype("int8")


def test_autocast_context_engages_only_for_low_precision():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    for dtype in (None, torch.float32):
        with precision.autocast_context("cpu", dtype):
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ b).dtype == torch.float32
    with precision.autocast_context(torch.device("cpu"), BF16):
        assert torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == BF16
    assert not torch.is_autocast_enabled("cpu")


# ------------------------------------------------------------------ bf16 against float32


@pytest.mark.parametrize("t", [0, 3, 5])
def test_bf16_energy_and_gradient_match_float32(t):
    ebm = build_ebm()
    lvl, x_next = chain_setup(t)
    with frozen(ebm):
        fn = energy_fn(ebm, lvl)
        e32, g32 = energy_and_grad(fn, x_next)
        e16, g16 = energy_and_grad(precision.autocast_energy_fn(fn, BF16), x_next)
    assert e16.dtype == g16.dtype == torch.float32
    assert not torch.equal(e16, e32), "autocast did not engage: bf16 energies equal fp32 bitwise"
    assert (e16 - e32).abs().max() <= 3e-2 * e32.abs().max()
    assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) >= 0.99
    assert (g16 - g32).norm() <= 0.15 * g32.norm()


def test_autocast_energy_fn_is_identity_for_float32():
    fn = energy_fn(build_ebm(), chain_setup(2)[0])
    assert precision.autocast_energy_fn(fn, None) is fn
    assert precision.autocast_energy_fn(fn, torch.float32) is fn


@pytest.mark.parametrize("t", [0, 5])  # the lowest level (tethered) and the top (no tether)
def test_bf16_langevin_matches_float32_and_keeps_the_state_float32(t):
    ebm = build_ebm()
    lvl, x_next = chain_setup(t)
    chains = {}
    with frozen(ebm):
        fn = energy_fn(ebm, lvl)
        for name, f in (("fp32", fn), ("bf16", precision.autocast_energy_fn(fn, BF16))):
            seen = []
            chains[name] = langevin_refine(
                f,
                x_next,
                x_next,
                sigma=lvl.sigma,
                tether=lvl.tether,
                step_size=lvl.step_size,
                n_steps=15,
                generator=torch.Generator().manual_seed(1),
                callback=lambda k, y, seen=seen: seen.append(y.dtype),
            )
            assert set(seen) == {torch.float32}
    move = (chains["fp32"] - x_next).norm()
    assert move > 0
    assert chains["bf16"].dtype == torch.float32
    assert not torch.equal(chains["bf16"], chains["fp32"])
    assert (chains["bf16"] - chains["fp32"]).norm() <= 5e-2 * move


def test_autocast_module_returns_float32_and_samples_match_float32(randomize_output):
    ebm, init = build_ebm(), randomize_output(build_initializer())
    scheduler = CDRLScheduler(n_steps=3)
    x_top = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    wrapped_ebm, wrapped_init = (
        precision.AutocastModule(ebm, BF16),
        precision.AutocastModule(init, BF16),
    )
    noise_level = torch.full((8,), 0.5)
    assert wrapped_ebm(x_top, noise_level).dtype == torch.float32
    assert wrapped_init(x_top, noise_level).dtype == torch.float32
    assert wrapped_ebm.net is ebm  # wraps, does not copy
    assert hasattr(wrapped_ebm, "context") and not hasattr(wrapped_init, "context")
    context = wrapped_ebm.context(noise_level)
    assert context[0].dtype == BF16  # stays in the autocast dtype, as inside the autocast forward
    energy = wrapped_ebm.energy(x_top, context)
    assert energy.dtype == torch.float32
    torch.testing.assert_close(energy, wrapped_ebm(x_top, noise_level))

    def run(e, i):
        settings = scheduler.langevin_settings()
        return sample(
            e, i, scheduler.schedule, x_top, settings, generator=torch.Generator().manual_seed(2)
        )

    x32, x16 = run(ebm, init), run(wrapped_ebm, wrapped_init)
    assert x16.dtype == torch.float32 and torch.isfinite(x16).all()
    assert not torch.equal(x16, x32)
    assert (x16 - x32).abs().max() <= 5e-2 * x32.abs().max()
    assert all(p.requires_grad for p in ebm.parameters())  # frozen() restored the wrapped network


# ------------------------------------------------------------------ layout, folding, TF32, compile


def test_channels_last_gives_the_same_energies_and_gradients():
    ebm = rgb_ebm()
    nhwc = precision.to_channels_last(copy.deepcopy(ebm))
    conv = nhwc.conv_in.parametrizations.weight.original
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()
    lvl, x_next = chain_setup(2, shape=(3, 8, 8))
    x_nhwc = precision.channels_last(x_next)
    assert x_nhwc.is_contiguous(memory_format=torch.channels_last)
    assert precision.channels_last(torch.zeros(2, 3)).shape == (2, 3)
    with frozen(ebm), frozen(nhwc):
        e, g = energy_and_grad(energy_fn(ebm, lvl), x_next)
        e_cl, g_cl = energy_and_grad(energy_fn(nhwc, lvl), x_nhwc)
    scale = e.abs().max()
    assert (e_cl - e).abs().max() <= 1e-5 * scale
    assert (g_cl - g).abs().max() <= 1e-5 * g.abs().max()


def test_fold_spectral_norm_is_exact_in_eval_mode():
    ebm = rgb_ebm()
    folded = precision.fold_spectral_norm(copy.deepcopy(ebm))
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    assert any(parametrize.is_parametrized(m) for m in ebm.modules())  # the original is untouched
    assert not folded.training
    lvl, x_next = chain_setup(1, shape=(3, 8, 8))
    with frozen(ebm), frozen(folded):
        e, g = energy_and_grad(energy_fn(ebm, lvl), x_next)
        e_f, g_f = energy_and_grad(energy_fn(folded, lvl), x_next)
    assert (e_f - e).abs().max() <= 1e-5 * e.abs().max()
    assert (g_f - g).abs().max() <= 1e-5 * g.abs().max()


def test_fold_spectral_norm_keeps_train_mode():
    ebm = rgb_ebm().train()
    assert precision.fold_spectral_norm(ebm).training


@pytest.fixture
def restore_tf32():
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def test_set_tf32_toggles_matmul_and_cudnn(restore_tf32):
    precision.set_tf32(True)
    assert precision.tf32_enabled()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"
    precision.set_tf32(False)
    assert not precision.tf32_enabled()
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


def test_maybe_compile_flag():
    ebm, init = build_ebm(), build_initializer()
    names = [name for name, _ in ebm.named_parameters()]
    assert precision.maybe_compile(ebm, False) is ebm
    assert ebm._compiled_call_impl is None and "energy" not in vars(ebm)
    # Lazy: nothing compiles until the first call.
    assert precision.maybe_compile(ebm, True, mode="max-autotune") is ebm
    assert ebm._compiled_call_impl is not None
    assert "energy" in vars(ebm)  # the Langevin path (energy_fn) calls energy directly
    assert [name for name, _ in ebm.named_parameters()] == names  # in place: no _orig_mod prefix
    assert precision.maybe_compile(init, True) is init
    assert init._compiled_call_impl is not None and "energy" not in vars(init)


@pytest.mark.parametrize("path", ["energy_fn", "forward"])
def test_compiled_ebm_traces_as_one_graph_and_matches_eager(path):
    """Dynamo only (a counting backend that runs the captured graph eagerly: no code generation, a few
    seconds). fullgraph=True fails on any graph break in the folded EBM, on the path Langevin takes
    (``energy_fn``: context once, then ``energy`` per step) and through ``forward``."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    eager = precision.fold_spectral_norm(build_ebm())
    compiled = precision.fold_spectral_norm(build_ebm())
    precision.maybe_compile(compiled, True, backend=counter, fullgraph=True)
    lvl, x_next = chain_setup(3, b=4)

    def run(net):
        if path == "energy_fn":
            return energy_and_grad(energy_fn(net, lvl), x_next)
        return energy_and_grad(lambda y: net(y, lvl.noise_level), x_next)

    with frozen(compiled):
        for _ in range(
            3
        ):  # the second call covers einops' one recompilation; the third hits the cache
            e_c, g_c = run(compiled)
        e, g = run(eager)
    assert 1 <= counter.frame_count <= 2
    assert counter.op_count > 20  # the convolutions are in the graph
    # the compiled graph may fuse and reorder float32 sums: a tolerance scaled to the magnitude
    assert_close_float32(e_c, e)
    assert_close_float32(g_c, g)
    torch._dynamo.reset()
