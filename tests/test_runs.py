import json

import pandas as pd
import pytest
import torch

from superposition.runs import load_run, partial_dir, run, save_run, train
from superposition.spec import SpecError


def test_save_load_identical(tmp_path, tiny_spec):
    spec = tiny_spec(instances={"data.feature_probability": [0.3, 0.03]})
    result = train(spec)
    out = save_run(result, tmp_path / "r")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "history.parquet",
        "instances.parquet",
        "model.safetensors",
        "report.html",
    ]
    loaded = load_run(out)
    assert loaded.spec == spec
    for (k, v), (k2, v2) in zip(result.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    x = torch.rand(16, 2, 5)
    assert torch.equal(result.model(x), loaded.model(x))
    pd.testing.assert_frame_equal(loaded.instances, result.instances)
    pd.testing.assert_frame_equal(loaded.history, result.history)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_version"] == torch.__version__ and config["engine"]


def test_residual_mlp_round_trip_keeps_embedding(tmp_path, tiny_spec):
    spec = tiny_spec(model={"kind": "residual-mlp", "n_features": 5, "d_hidden": 3, "d_embed": 12})
    result = run(spec, tmp_path / "r")
    loaded = load_run(tmp_path / "r")
    assert torch.equal(loaded.model.W_E, result.model.W_E)


def test_run_folder_appears_only_when_complete(tmp_path, tiny_spec):
    out = tmp_path / "r"
    run(tiny_spec(train={"checkpoint_every": 10}), out)
    assert out.is_dir() and not partial_dir(out).exists()
    assert not list(out.glob("checkpoint*"))
    with pytest.raises(SpecError, match="already exists"):
        run(tiny_spec(), out)
    before = (out / "model.safetensors").read_bytes()
    run(tiny_spec(seed=5), out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_resume_from_checkpoint_is_bit_identical(tmp_path, tiny_spec, crash_and_resume):
    spec = tiny_spec(train={"checkpoint_every": 20, "steps": 60}, instances={"seed": [0, 1]})
    straight = run(spec, tmp_path / "a")
    resumed = crash_and_resume(spec, tmp_path / "b", at_step=40)
    assert resumed.history["step"].tolist() == straight.history["step"].tolist()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v)
    pd.testing.assert_frame_equal(resumed.history, straight.history)
    pd.testing.assert_frame_equal(resumed.instances, straight.instances)
