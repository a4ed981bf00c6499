import json

import pytest
import tomllib

from superposition.spec import (
    Experiment,
    SpecError,
    apply_overrides,
    load_quick,
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


# -- --quick: one meaning for every spec -------------------------------------------------------------------------------
def test_quick_without_a_quick_table_caps_steps_cuts_each_axis_to_first_and_last_and_says_so():
    raw = {
        "name": "t",
        "train": {"steps": 10000, "schedule": "warmup-cosine", "warmup_steps": 500},
        "instances": {"data.feature_probability": [1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001], "seed": [0, 1, 2]},
        "sae": {"steps": 20000, "resample_every": 2000},
    }
    full = load_spec(raw)
    spec, line = load_quick(raw)
    assert load_spec(raw, quick=True) == spec
    assert spec.model == full.model  # shapes unchanged
    assert (spec.train.steps, spec.train.warmup_steps) == (300, 15)
    assert spec.instances.axes == {"data.feature_probability": [1.0, 0.001], "seed": [0, 2]}
    assert spec.n_instances == 4
    sae = spec.sae
    assert (sae.steps, sae.resample_every, sae.resample_window, sae.log_every) == (1000, 100, 25, 5)
    assert line == (
        "quick: train.steps 10000 -> 300, train.warmup_steps 500 -> 15, data.feature_probability 7 -> 2 values, "
        "seed 3 -> 2 values, sae.steps 20000 -> 1000, sae.resample_every 2000 -> 100, sae.resample_window 500 -> 25, "
        "sae.log_every 100 -> 5"
    )


def test_quick_cuts_zipped_lists_together_and_sweep_axes_to_first_and_last():
    zipped = {"instances": {"combine": "zip", "seed": [1, 2, 3, 4], "data.feature_probability": [0.5, 0.4, 0.3, 0.2]}}
    spec, line = load_quick(zipped)
    assert spec.instances.axes == {"seed": [1, 4], "data.feature_probability": [0.5, 0.2]} and spec.n_instances == 2
    assert line == "quick: train.steps 5000 -> 300, seed 4 -> 2 values, data.feature_probability 4 -> 2 values"
    # a [quick] table that names one zipped list keeps them all (cutting only the others would break the zip)
    spec = load_spec({**zipped, "quick": {"instances.seed": [7, 8, 9, 10]}}, quick=True)
    assert spec.instances.axes == {"seed": [7, 8, 9, 10], "data.feature_probability": [0.5, 0.4, 0.3, 0.2]}
    sweep = {
        "sweep": {
            "axes": {"model.d_hidden": [2, 3, 4, 5], "data.feature_probability": [0.1, 0.2, 0.3]},
            "labels": {"tag": ["a", "b", "c"]},
            "zip": [["tag", "data.feature_probability"]],
        }
    }
    spec, line = load_quick(sweep)
    assert spec.sweep.axes == {"model.d_hidden": [2, 5], "data.feature_probability": [0.1, 0.3]}
    assert spec.sweep.labels == {"tag": ["a", "c"]} and spec.sweep.zip == [["tag", "data.feature_probability"]]
    assert line == (
        "quick: train.steps 5000 -> 300, sweep.axes.model.d_hidden 4 -> 2 values, "
        "sweep.axes.data.feature_probability 3 -> 2 values, sweep.labels.tag 3 -> 2 values"
    )
    # a sweep over train.steps is capped too
    spec = load_spec({"sweep": {"axes": {"train.steps": [100, 1000, 5000]}}}, quick=True)
    assert spec.sweep.axes == {"train.steps": [100, 300]}


def test_quick_keeps_what_a_quick_table_sets_and_set_overrides_win():
    assert load_spec("neuron-model", quick=True).train.steps == 6000  # above 300, but the preset's own choice
    geometry = load_spec("geometry", quick=True)
    assert geometry.instances.axes["data.feature_probability"] == [1.0, 0.1, 0.01]
    rec, line = load_quick("sae-recovery")
    assert (rec.train.steps, rec.sae.steps, rec.sae.resample_every, rec.sae.resample_window) == (2000, 3000, 500, 200)
    assert rec.instances.axes["seed"] == [0, 15]  # what [quick] does not name gets the generic cut
    assert "sae.steps 20000 -> 3000" in line and "seed 16 -> 2 values" in line
    assert len(load_spec("hierarchy", quick=True).sweep.labels["variant"]) == 3
    spec, line = load_quick("demo", ["train.steps=2000"])
    assert spec.train.steps == 2000 and "train.steps" not in line
    assert line == "quick: data.feature_probability 4 -> 2 values"
    assert load_quick({"train": {"steps": 100}, "instances": {"seed": [1, 2]}})[1] == ""  # nothing shrunk


def test_quick_result_of_every_preset_is_valid_and_keeps_shapes():
    for name in preset_names():
        full, (quick, line) = load_spec(name), load_quick(name)
        assert quick.model == full.model and quick.task == full.task, name
        assert quick.n_instances <= full.n_instances and line.startswith("quick: "), name


def test_unknown_preset_names_the_closest():
    with pytest.raises(SpecError, match=r"^'dmeo' is neither a spec file nor a preset \(did you mean 'demo'\?\)$"):
        load_spec("dmeo")
    with pytest.raises(SpecError, match=r"unknown preset 'pentgon' \(did you mean 'pentagon'\?\)"):
        preset_text("pentgon")
    with pytest.raises(SpecError, match=r"\(presets: abs-computation, .*demo"):
        load_spec("zzzzzzzz")
