"""Bad arguments to the Python API: ``CDRLPipeline.__call__``, ``from_pretrained`` and ``CDRLScheduler``
raise ValueError or TypeError whose message names the argument, before any sampling; and a saved
pipeline whose configs or weights are bad is refused at load, naming the file.

Before these checks, most of these calls returned silently (nan samples, a fractional label truncated, a
0..255 image read as far out of range, an argument ignored) or failed deep inside torch.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from cdrl.checks import MAX_SAMPLES
from cdrl.pipeline import CDRLPipeline, CDRLScheduler

IMAGE = torch.rand(1, 1, 8, 8)
MASK = torch.zeros(1, 1, 8, 8).index_fill_(2, torch.tensor([2, 3, 4, 5]), 1.0)

# (id, model: "uncond" | "cond", call kwargs, exception type, fragment of the message)
CALLS = [
    # class A: silent nan or garbage before
    (
        "guidance-nan",
        "cond",
        dict(class_labels=[1], guidance_scale=math.nan),
        ValueError,
        "guidance_scale must be a finite number, got nan",
    ),
    (
        "guidance-inf",
        "cond",
        dict(class_labels=[1], guidance_scale=math.inf),
        ValueError,
        "guidance_scale must be a finite number, got inf",
    ),
    (
        "fractional-labels",
        "cond",
        dict(class_labels=[1.5]),
        ValueError,
        "class_labels must be whole numbers, got 1.5",
    ),
    (
        "fractional-label-tensor",
        "cond",
        dict(class_labels=torch.tensor([0.0, 2.5])),
        ValueError,
        "class_labels must be whole numbers, got 2.5",
    ),
    (
        "uint8-image",
        "uncond",
        dict(image=(IMAGE * 255).to(torch.uint8), mask_image=MASK),
        TypeError,
        "image must be a float tensor in [0, 1], got torch.uint8",
    ),
    (
        "0-255-float-image",
        "uncond",
        dict(image=IMAGE * 255, mask_image=MASK),
        ValueError,
        "image values must be in [0, 1]",
    ),
    (
        "minus-one-to-one-image",
        "uncond",
        dict(image=IMAGE * 2 - 1, mask_image=MASK),
        ValueError,
        "image values must be in [0, 1]",
    ),
    (
        "uint8-mask",
        "uncond",
        dict(image=IMAGE, mask_image=(MASK * 255).to(torch.uint8)),
        TypeError,
        "mask_image must be a float tensor in [0, 1]",
    ),
    (
        "nan-image",
        "uncond",
        dict(image=torch.full_like(IMAGE, math.nan), mask_image=MASK),
        ValueError,
        "image holds nan or infinite values",
    ),
    (
        "negative-langevin-steps",
        "uncond",
        dict(num_langevin_steps=-1),
        ValueError,
        "num_langevin_steps must be >= 0, got -1",
    ),
    (
        "noise-scale-nan",
        "uncond",
        dict(langevin_noise_scale=math.nan),
        ValueError,
        "langevin_noise_scale must be a finite number",
    ),
    (
        "compose-weight-nan",
        "cond",
        dict(compose=[((2,), math.nan)]),
        ValueError,
        "compose[0] weight must be a finite number",
    ),
    (
        "compose-fractional-label",
        "cond",
        dict(compose=[((2.5,), 1.0)]),
        TypeError,
        "compose[0] labels[0] must be an integer",
    ),
    # class B: counts that would exhaust memory or time
    (
        "huge-batch",
        "uncond",
        dict(batch_size=10**12),
        ValueError,
        f"batch_size must be <= {MAX_SAMPLES:,}",
    ),
    (
        "huge-langevin-steps",
        "uncond",
        dict(num_langevin_steps=10**12),
        ValueError,
        "num_langevin_steps must be <= 100,000",
    ),
    (
        "huge-resample",
        "uncond",
        dict(image=IMAGE, mask_image=MASK, resample=10**9),
        ValueError,
        "resample must be <= 1,000",
    ),
    # class E: errors that did not name the argument
    ("batch-0", "uncond", dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    ("batch-float", "uncond", dict(batch_size=2.0), TypeError, "batch_size must be an integer"),
    (
        "samples-per-image-0",
        "uncond",
        dict(image=IMAGE, mask_image=MASK, num_samples_per_image=0),
        ValueError,
        "num_samples_per_image must be >= 1, got 0",
    ),
    (
        "generator-int",
        "uncond",
        dict(generator=0),
        TypeError,
        "generator must be a torch.Generator or a list of them",
    ),
    (
        "generator-list-of-ints",
        "uncond",
        dict(batch_size=2, generator=[1, 2]),
        TypeError,
        "generator must hold torch.Generator objects",
    ),
    (
        "generator-list-length",
        "uncond",
        dict(batch_size=2, generator=[torch.Generator()]),
        ValueError,
        "generator: got 1 generators for a batch of 2",
    ),
    (
        "compose-labels-not-a-list",
        "cond",
        dict(compose=[(3, 1.0)]),
        TypeError,
        "compose[0] labels must be a list",
    ),
    (
        "compose-term-not-a-pair",
        "cond",
        dict(compose=[((3,), 1.0, 2.0)]),
        TypeError,
        "compose[0] must be a (labels, weight) pair",
    ),
    ("compose-not-a-list", "cond", dict(compose="3"), TypeError, "compose must be a list"),
    # class E: an argument silently ignored when combined with another
    (
        "class-labels-and-compose",
        "cond",
        dict(class_labels=[1], compose=[((2,), 1.0)]),
        ValueError,
        "class_labels and compose were both given",
    ),
    (
        "batch-size-with-other-label-count",
        "cond",
        dict(batch_size=4, class_labels=[1, 2]),
        ValueError,
        "batch_size=4, but 2 class_labels",
    ),
    (
        "batch-size-with-inpainting",
        "uncond",
        dict(batch_size=3, image=IMAGE, mask_image=MASK),
        ValueError,
        "batch_size=3, but inpainting",
    ),
    (
        "samples-per-image-without-image",
        "uncond",
        dict(num_samples_per_image=3),
        ValueError,
        "num_samples_per_image is for inpainting and needs image",
    ),
    ("mask-without-image", "uncond", dict(mask_image=MASK), ValueError, "mask_image needs image"),
]


@pytest.fixture(scope="module")
def pipelines() -> dict[str, CDRLPipeline]:
    from conftest import build_ebm, build_initializer

    found = {}
    for kind, sizes in (("uncond", ()), ("cond", (10,))):
        pipe = CDRLPipeline(
            ebm=build_ebm(condition_sizes=sizes),
            initializer=build_initializer(condition_sizes=sizes),
            scheduler=CDRLScheduler(n_steps=1),
        )
        pipe.set_progress_bar_config(disable=True)
        found[kind] = pipe
    return found


@pytest.mark.parametrize(
    ("kind", "kwargs", "error", "says"), [pytest.param(*row[1:], id=row[0]) for row in CALLS]
)
def test_bad_call_argument_is_named(pipelines, kind, kwargs, error, says, monkeypatch):
    import cdrl.pipeline

    def no_sampling(*args, **kw):
        raise AssertionError("sampling started")

    monkeypatch.setattr(cdrl.pipeline, "sample", no_sampling)
    with pytest.raises(error) as caught:
        pipelines[kind](output_type="pt", **kwargs)
    assert says in str(caught.value)


def test_float16_networks_are_refused_naming_torch_dtype(pipelines, tmp_path):
    pipelines["uncond"].save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match=r"torch_dtype=torch.float16 is not supported"):
        CDRLPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.float16)
    pipe = CDRLPipeline.from_pretrained(tmp_path / "p").to(torch.float16)
    with pytest.raises(ValueError, match=r"the networks are torch.float16 \(torch_dtype"):
        pipe(output_type="pt")


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("data_scale", 0.0, "data_scale must be > 0, got 0.0"),
        ("data_scale", -1.0, "data_scale must be > 0"),
        ("b2", -4e-4, "b2 must be > 0"),
        ("step_scale", 0, "step_scale must be > 0"),
        ("clip_sample_range", 0.0, "clip_sample_range must be > 0"),
        ("clip_sample", "yes", "clip_sample must be true or false"),
        ("refine_top", 7, "refine_top (7) must be at most num_levels (6)"),
        ("refine_top", -1, "refine_top must be an integer"),
        ("noise_scale", -1.0, "noise_scale must be >= 0"),
        ("n_steps", -3, "n_steps must be an integer in [0, 100,000]"),
        ("n_steps", 2.5, "n_steps must be an integer"),
        ("num_levels", 0, "num_levels must be an integer in [1,"),
        ("tweedie", "yes", "tweedie must be true or false"),
        ("kind", "ddpm", "kind must be 'cdrl' or 'drl'"),
        ("condition_offsets", [[[1.0, "x"]]], "condition_offsets must be"),
    ],
)
def test_scheduler_config_is_checked_at_load(pipelines, tmp_path, key, value, says):
    pipelines["uncond"].save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(ValueError, match="scheduler_config.json") as caught:
        CDRLPipeline.from_pretrained(tmp_path / "p")
    assert says in str(caught.value)
    with pytest.raises(ValueError, match=f"CDRLScheduler: {key}"):
        CDRLScheduler(**{key: value})


def test_scheduler_config_nan_is_refused(pipelines, tmp_path):
    pipelines["uncond"].save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "scheduler" / "scheduler_config.json"
    path.write_text(path.read_text().replace('"b2": 0.0004', '"b2": NaN'))
    with pytest.raises(ValueError, match="scheduler_config.json: b2 must be a finite number"):
        CDRLPipeline.from_pretrained(tmp_path / "p")


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda c: [c], "config.json: it must hold a JSON object, got list"),
        (
            lambda c: {k: v for k, v in c.items() if k != "sample_size"},
            "key 'sample_size' is missing",
        ),
        (lambda c: {**c, "sample_size": -8}, "sample_size must be an integer in [1,"),
        (lambda c: {**c, "base_channels": 16.5}, "base_channels must be an integer"),
        (lambda c: {**c, "channel_mult": 2}, "channel_mult must be a list"),
        (lambda c: {**c, "spectral_norm": "no"}, "spectral_norm must be true or false"),
    ],
    ids=["list", "missing-key", "negative-size", "float-width", "not-a-list", "not-a-bool"],
)
def test_network_config_is_checked_at_load(pipelines, tmp_path, edit, says):
    pipelines["uncond"].save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "ebm" / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match="ebm/config.json") as caught:
        CDRLPipeline.from_pretrained(tmp_path / "p")
    assert says in str(caught.value)


def test_model_index_that_is_a_list_is_refused(pipelines, tmp_path):
    pipelines["uncond"].save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="model_index.json must hold a JSON object"):
        CDRLPipeline.from_pretrained(tmp_path / "p")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_are_refused_naming_the_file(pipelines, tmp_path, bad):
    pipelines["uncond"].save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "initializer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    key = sorted(k for k, v in weights.items() if v.is_floating_point())[0]
    weights[key].view(-1)[0] = bad
    save_file(weights, path)
    kind = "nan" if math.isnan(bad) else "infinite"
    with pytest.raises(
        ValueError,
        match=f"initializer/diffusion_pytorch_model.safetensors: tensor {key} holds {kind}",
    ):
        CDRLPipeline.from_pretrained(tmp_path / "p")
