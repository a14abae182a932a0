"""Tests of cdrl.models: shapes, conditioning, serialization, paper-scale sizes, initialization, spectral norm.

Sign convention (cdrl.models.ebm): the EBMs return an energy E (b,), lower is likelier; f = -E.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close_float32
from torch import nn
from torch.nn.utils import parametrize

from cdrl.models import EnergyMLP, EnergyResNet, InitializerMLP, InitializerUNet

NUM_CLASSES = 10  # the conftest's conditional models: condition_sizes=(10,)
KINDS = ["ebm", "initializer", "mlp_ebm", "mlp_initializer"]


@pytest.fixture
def build(request, randomize_output):
    """build(kind, conditional) -> (model, input shape) from the conftest fixtures."""

    def make(kind: str, conditional: bool):
        name = {
            "ebm": "tiny_cond_ebm" if conditional else "tiny_ebm",
            "initializer": "tiny_cond_initializer" if conditional else "tiny_initializer",
            "mlp_ebm": "mlp_cond_ebm" if conditional else "mlp_ebm",
            "mlp_initializer": "mlp_cond_initializer" if conditional else "mlp_initializer",
        }[kind]
        model = request.getfixturevalue(name)
        if "initializer" in kind:
            randomize_output(model)  # so that the condition and the input actually matter
        shape = (1, 8, 8) if kind in ("ebm", "initializer") else (2,)
        return model, shape

    return make


def _inputs(shape, b=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=gen), torch.rand(b, generator=gen)


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_output_shapes(build, kind, conditional):
    model, shape = build(kind, conditional)
    x, level = _inputs(shape)
    cond = torch.tensor([[0], [5], [NUM_CLASSES]]) if conditional else None
    out = model(x, level, cond)
    expected = (3,) if "ebm" in kind else (3, *shape)
    assert out.shape == expected and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_unconditional_model_rejects_conditions(build, kind):
    model, shape = build(kind, False)
    x, level = _inputs(shape)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, level, torch.zeros(3, 1, dtype=torch.long))


@pytest.mark.parametrize("kind", KINDS)
def test_conditional_model_without_cond_uses_the_null_label(build, kind):
    model, shape = build(kind, True)
    x, level = _inputs(shape)
    null = torch.full((3, 1), NUM_CLASSES)
    torch.testing.assert_close(model(x, level), model(x, level, null), rtol=0, atol=0)
    # a (b,) label vector means the same as (b, 1)
    labels = torch.tensor([1, 2, 3])
    torch.testing.assert_close(model(x, level, labels), model(x, level, labels[:, None]))
    # the label matters
    assert not torch.allclose(model(x, level, labels[:, None]), model(x, level, null), atol=1e-5)


@pytest.mark.parametrize("kind", ["ebm", "mlp_ebm"])
def test_energy_depends_on_input_and_noise_level(build, kind):
    model, shape = build(kind, False)
    x, level = _inputs(shape)
    base = model(x, level)
    assert not torch.allclose(base, model(x + 0.1, level))
    assert not torch.allclose(base, model(x, level.flip(0) * 0.5 + 0.2))


def _public_config(model) -> dict:
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(build, tmp_path, kind, conditional):
    model, shape = build(kind, conditional)
    x, level = _inputs(shape)
    model.train()  # spectral norm's u, v buffers move in train mode: the saved state must carry them
    for _ in range(2):
        model(x, level)
    model.eval()
    model.save_pretrained(tmp_path / kind)
    # diffusers' default (meta-device) loading is slow with spectral norm (its init runs power
    # iterations through Python reference ops on meta tensors, ~0.3 s per layer): exercise it on
    # the unconditional models only
    loaded = type(model).from_pretrained(tmp_path / kind, low_cpu_mem_usage=not conditional)
    assert not loaded.training
    assert _public_config(loaded) == _public_config(model)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    # bit-exact: safetensors stores and reads back every bit (spectral norm's u, v too)
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    cond = torch.tensor([[0], [5], [NUM_CLASSES]]) if conditional else None
    with torch.no_grad():
        # equal state dicts; the kernels may still round differently (memory alignment)
        assert_close_float32(loaded(x, level, cond), model(x, level, cond))


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("factory", "millions"),
    [
        (lambda: EnergyResNet(spectral_norm=False), 34.8),
        (lambda: EnergyResNet(spectral_norm=False, condition_sizes=(1000,)), 35.3),
        (lambda: InitializerUNet(), 3.8),
    ],
    ids=["ebm", "ebm-cond", "initializer"],
)
def test_paper_scale_parameter_counts(factory, millions):
    # on the meta device (no memory, no init); spectral norm adds buffers, not parameters (see below)
    with torch.device("meta"):
        model = factory()
    assert _num_params(model) == pytest.approx(millions * 1e6, rel=0.03)


def test_spectral_norm_adds_no_parameters():
    kwargs = dict(in_channels=1, sample_size=8, base_channels=16, channel_mult=(1, 2))
    assert _num_params(EnergyResNet(**kwargs)) == _num_params(
        EnergyResNet(**kwargs, spectral_norm=False)
    )


@pytest.mark.parametrize("kind", ["initializer", "mlp_initializer"])
@pytest.mark.parametrize("conditional", [False, True])
def test_initializer_is_zero_initialized(request, kind, conditional):
    name = {
        "initializer": "tiny_cond_initializer" if conditional else "tiny_initializer",
        "mlp_initializer": "mlp_cond_initializer" if conditional else "mlp_initializer",
    }[kind]
    model = request.getfixturevalue(name).train()  # dropout etc. cannot break it either
    shape = (1, 8, 8) if kind == "initializer" else (2,)
    x, level = _inputs(shape)
    cond = torch.tensor([[1], [2], [3]]) if conditional else None
    assert torch.equal(model(x, level, cond), x)  # bit-exact: a zero output layer adds exact zeros


def test_paper_scale_initializer_is_zero_initialized():
    model = InitializerUNet(
        block_out_channels=(32, 32, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=8
    )
    x, level = _inputs((3, 32, 32), b=2)
    with torch.no_grad():
        assert torch.equal(model(x, level), x)  # bit-exact: as above


def _is_spectral_normed(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        type(p).__name__ == "_SpectralNorm" for p in module.parametrizations.weight
    )


@pytest.mark.parametrize("kind", ["ebm", "mlp_ebm"])
@pytest.mark.parametrize("conditional", [False, True])
def test_spectral_norm_on_every_layer_but_the_head(build, kind, conditional):
    model, _ = build(kind, conditional)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert "head" in layers and len(layers) > 5
    assert not parametrize.is_parametrized(layers.pop("head"))
    unnormed = [name for name, module in layers.items() if not _is_spectral_normed(module)]
    assert unnormed == []


def test_spectral_norm_can_be_switched_off():
    model = EnergyMLP(hidden=16, channel_mult=(1,), spectral_norm=False)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    model = InitializerMLP(hidden=16, temb_dim=16, norm_num_groups=4)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
