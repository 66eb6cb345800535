"""Shipped recipes: each parses, validates and builds a run configuration; flags override them."""

from __future__ import annotations

import pytest

from braintumor.cli import main
from braintumor.training.config import list_recipes, read_recipe, resolve_config
from braintumor.errors import UserError

EXPECTED = {"seed", "scratch-gpu", "scratch-cpu", "distill"}


def test_the_four_recipes_are_listed_with_a_description(capsys):
    recipes = list_recipes()
    assert EXPECTED <= set(recipes) and all(recipes[name] for name in recipes)
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_recipe_parses_and_validates(name):
    values = read_recipe(name)
    cfg = resolve_config(values, {"data": "DATA", **({"teacher": "reference"} if name == "distill" else {})})
    assert cfg.recipe == name
    # Every float option really is a float (PyYAML reads 1e-5 without a dot as a string).
    assert isinstance(cfg.lr, float) and cfg.lr > 0


def test_seed_is_exactly_the_reference_recipe():
    cfg = resolve_config(read_recipe("seed"), {"data": "DATA"})
    assert (cfg.arch, cfg.weights, cfg.optimizer, cfg.lr, cfg.batch_size) == ("resnet152", "imagenet", "ranger",
                                                                            1e-5, 32)
    assert cfg.rotation > 0 and cfg.scale == cfg.translate == cfg.brightness == cfg.ema == 0 and not cfg.tta


def test_distill_is_the_reference_models_recipe_and_needs_a_teacher():
    from braintumor.models.checkpoint import load_checkpoint

    recipe = read_recipe("distill")
    trained = load_checkpoint("reference")["config"]  # the run that made the shipped model
    assert {key: trained[key] for key in recipe if key != "recipe"} == {
        key: value for key, value in recipe.items() if key != "recipe"}
    assert trained["teacher"] and trained["distill_weight"] > 0
    with pytest.raises(UserError, match="distill recipe needs a teacher"):
        resolve_config(recipe, {"data": "DATA"})


def test_flags_override_the_recipe_and_unknown_recipes_are_refused():
    cfg = resolve_config(read_recipe("scratch-cpu"), {"data": "DATA", "epochs": 3, "lr": 0.01})
    assert cfg.epochs == 3 and cfg.lr == 0.01 and cfg.arch == "resnet18"
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        read_recipe("nope")


def test_yaml_number_strings_are_coerced_and_bad_ones_named(tmp_path):
    from braintumor.training.config import read_config_file

    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nepochs: 3.0\n")
    cfg = resolve_config(read_config_file(path), {"data": "DATA"})
    assert cfg.lr == 1e-5 and cfg.epochs == 3 and isinstance(cfg.epochs, int)
    path.write_text("lr: fast\n")
    with pytest.raises(UserError, match="lr in .* must be a number"):
        resolve_config(read_config_file(path), {"data": "DATA"})
