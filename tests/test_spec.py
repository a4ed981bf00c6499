import json

import pytest
import tomllib

from superposition.spec import (
    Experiment,
    SpecError,
    apply_overrides,
    load_spec,
    parse_spec,
    preset_names,
    preset_text,
)


def test_defaults_resolve_per_kind():
    assert parse_spec({"model": {"kind": "relu-output"}}).model.tied is True
    assert parse_spec({"model": {"kind": "mlp"}}).model.tied is False
    rm = parse_spec({"model": {"kind": "residual-mlp", "n_features": 10}})
    assert rm.model.d_embed == 1000 and rm.model.bias_out is False
    ident = parse_spec({"model": {"kind": "residual-mlp", "n_features": 10, "embedding": "identity"}})
    assert ident.model.d_embed == 10


def test_hierarchy_derives_feature_count():
    spec = parse_spec({"data": {"kind": "hierarchy", "tree_depth": 3}})
    assert spec.model.n_features == 14
    with pytest.raises(SpecError, match="model.n_features"):
        parse_spec({"data": {"kind": "hierarchy", "tree_depth": 3}, "model": {"n_features": 5}})


def test_round_trip_toml_object_json_object(tmp_path):
    text = preset_text("relu-vs-linear")
    raw = tomllib.loads(text)
    raw.pop("quick")
    spec = parse_spec(raw)
    again = Experiment.model_validate(json.loads(spec.to_json()))
    assert again == spec
    path = tmp_path / "s.json"
    path.write_text(spec.to_json())
    assert load_spec(path) == spec


def test_grid_product_and_zip():
    spec = parse_spec(
        {"instances": {"data": {"feature_probability": [1.0, 0.1, 0.01]}, "model.kind": ["linear", "relu-output"]}}
    )
    assert spec.n_instances == 6
    assert spec.grid()[1] == {"data.feature_probability": 1.0, "model.kind": "relu-output"}
    zipped = parse_spec({"instances": {"combine": "zip", "seed": [1, 2], "data.feature_probability": [0.5, 0.25]}})
    assert zipped.n_instances == 2
    assert zipped.instance_values("data.feature_probability") == [0.5, 0.25]
    assert zipped.instance_values("train.lr") == [1e-3, 1e-3]


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"model": {"n_features": -3}}, "model.n_features"),
        ({"model": {"kind": "cnn"}}, "model.kind"),
        ({"model": {"colour": 1}}, "model.colour"),
        ({"data": {"feature_probability": 1.5}}, "data.feature_probability"),
        ({"data": {"feature_probability": 0}}, "data.feature_probability"),
        ({"data": {"feature_probability": float("nan")}}, "data.feature_probability"),
        ({"data": {"kind": "anticorrelated", "feature_probability": 0.7}}, "anticorrelated"),
        ({"data": {"n_correlated_pairs": 4}, "model": {"n_features": 5}}, "pairs need"),
        ({"task": {"importance": [1.0, 2.0]}}, "task.importance"),
        ({"instances": {"data.feature_probability": [0.1, 2.0]}}, "data.feature_probability"),
        ({"instances": {"model.n_features": [1, 2]}}, "not an instance axis"),
        ({"instances": {"seed": []}}, "non-empty"),
        ({"train": {"steps": "many"}}, "train.steps"),
    ],
)
def test_bad_specs_name_the_field(raw, field):
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    message = str(info.value)
    assert field in message
    assert "\n" not in message


def test_overrides_parse_values_and_revalidate():
    raw = apply_overrides({}, ["model.d_hidden=3", "train.lr=0.01", "model.kind=linear", "task.importance=[1, 2]"])
    assert raw == {"model": {"d_hidden": 3, "kind": "linear"}, "train": {"lr": 0.01}, "task": {"importance": [1, 2]}}
    with pytest.raises(SpecError, match="section.field=value"):
        apply_overrides({}, ["model.d_hidden"])
    spec = load_spec("demo", ["model.d_hidden=3", "instances.seed=[1,2]"])
    assert spec.model.d_hidden == 3 and spec.n_instances == 16


def test_quick_shrinks_steps_not_shapes():
    full, quick = load_spec("relu-vs-linear"), load_spec("relu-vs-linear", quick=True)
    assert quick.train.steps < full.train.steps
    assert (quick.model, quick.n_instances) == (full.model, full.n_instances)


def test_presets_all_parse():
    for name in preset_names():
        assert load_spec(name).name
        assert load_spec(name, quick=True).train.steps >= 1
