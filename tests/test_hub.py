"""An exported folder in diffusers' own loader (the community-pipeline route), with our loading checks
still applied on that route, and the model card the export carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from safetensors.torch import load_file, save_file

from cdrl.config import config_path, load_config
from cdrl.export import MODEL_CARD, TRAINING_CONFIG, export_pipeline, model_card
from cdrl.pipeline import PIPELINE_MODULE, CDRLPipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies a community pipeline's file into its modules cache: keep it in the test's folder."""
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


@pytest.fixture
def exported(tiny_pipeline, tmp_path) -> Path:
    folder = tmp_path / "pipeline"
    cfg = load_config(config_path("debug"), [])
    export_pipeline(
        tiny_pipeline,
        cfg,
        folder,
        step=7,
        command="cdrl-train --config debug",
        figures={"ebm/loss": 0.25},
    )
    return folder


def _sample(pipe, seed=0):
    return pipe(
        batch_size=2, generator=torch.Generator().manual_seed(seed), output_type="pt"
    ).images


def test_diffusers_generic_loader_loads_an_export_and_samples_as_ours_does(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == [PIPELINE_MODULE, "CDRLPipeline"]
    generic = DiffusionPipeline.from_pretrained(exported, trust_remote_code=True)
    assert isinstance(generic, CDRLPipeline)
    ours = CDRLPipeline.from_pretrained(exported)
    # same weights, seed, batch and process: the two routes build the same pipeline
    assert torch.equal(_sample(generic), _sample(ours))


def test_our_loader_never_runs_the_folders_python_file(exported, tmp_path):
    marker = tmp_path / "ran"
    (exported / f"{PIPELINE_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    CDRLPipeline.from_pretrained(exported)
    assert not marker.exists()


def test_diffusers_loader_needs_trust_remote_code_for_the_folders_file(exported):
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(exported)


def test_pickle_only_weights_are_refused_on_the_diffusers_route(exported):
    part = exported / "ebm"
    torch.save(load_file(part / WEIGHTS), part / "diffusion_pytorch_model.bin")
    (part / WEIGHTS).unlink()
    with pytest.raises(ValueError, match="pickle weights"):
        DiffusionPipeline.from_pretrained(exported, trust_remote_code=True)


def test_non_finite_weights_are_refused_on_the_diffusers_route(exported):
    part = exported / "initializer"
    state = load_file(part / WEIGHTS)
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, part / WEIGHTS)
    with pytest.raises(ValueError, match="diverged in training or the file is damaged"):
        DiffusionPipeline.from_pretrained(exported, trust_remote_code=True)


def test_weights_that_do_not_match_their_config_are_refused_on_the_diffusers_route(exported):
    part = exported / "ebm"
    state = load_file(part / WEIGHTS)
    state["extra.weight"] = torch.zeros(3)
    save_file(state, part / WEIGHTS)
    with pytest.raises(ValueError, match="does not match its weights"):
        DiffusionPipeline.from_pretrained(exported, trust_remote_code=True)


def test_export_carries_a_model_card_with_the_command_and_the_figures(exported):
    card = (exported / MODEL_CARD).read_text()
    assert card.startswith("---\nlibrary_name: cdrl\n")
    assert "`cdrl-train --config debug`" in card
    assert "7 optimizer steps" in card
    assert "| ebm/loss | 0.25 |" in card
    assert (exported / TRAINING_CONFIG).is_file()


def test_model_card_says_when_nothing_was_measured(tiny_cond_pipeline):
    card = model_card(tiny_cond_pipeline, load_config(config_path("debug"), []))
    assert "Nothing was measured at export." in card
    assert "command: not recorded" in card
    assert "class-conditional-image-generation" in card
