"""Notebook views: HTML summaries of runs, sweeps and SAE folders, figures by name, offline figure display, the
notebook progress bar and the message of an interrupted run."""

from __future__ import annotations

import re

import pytest

import superposition as sp
import superposition.runs as runs_module
from superposition import sweep as sw
from superposition.display import Displayable, PresenterMissing
from superposition.plots import figures_for_run
from superposition.progress import notebook_bar
from superposition.sae_report import sae_figures
from superposition.spec import SaeSpec, SpecError, parse_spec
from superposition.sweep.report import sweep_figures
from superposition.views import Figure

HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def _raw(**sections):
    raw = {
        "name": HOSTILE,
        "model": {"kind": "relu-output", "n_features": 5, "d_hidden": 2},
        "data": {"feature_probability": 0.1},
        "task": {"importance": 0.9},
        "train": {"steps": 40, "batch_size": 64, "log_every": 10, "eval_batch": 256, "engine": "eager"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _no_remote_script(text: str) -> bool:
    return re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//", text, re.IGNORECASE) is None


def _check_escaped(page: str) -> None:
    assert HOSTILE not in page and ESCAPED in page
    assert "<script" not in page.lower()  # a summary is tables and text only


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    grid = {"model.kind": ["linear", "relu-output"], "data.feature_probability": [1.0, 0.1]}
    spec = parse_spec(_raw(instances=grid))
    return sp.run(spec, tmp_path_factory.mktemp("nb") / "run")


def test_run_summary_is_escaped_and_compact(saved_run):
    page = saved_run._repr_html_()
    _check_escaped(page)
    for text in ("relu-output, 5 features in 2 dims", "4 (model.kind (2) × data.feature_probability (2))"):
        assert text in page
    assert "represented features (norm &gt; 0.5) by model.kind" in page and "final loss" in page
    assert "eager engine" in page and str(saved_run.path) in page
    assert len(repr(saved_run).splitlines()) == 1
    again = sp.load_run(saved_run.path)  # a loaded run shows itself too
    _check_escaped(again._repr_html_())


def test_run_figures_are_the_reports(saved_run):
    report = {name: fig for name, _, fig in figures_for_run(saved_run)}
    assert saved_run.figures() == list(report)
    for name in ("features-nd", "loss"):
        fig = saved_run.figure(name)
        assert isinstance(fig, Figure) and fig == report[name]
    assert saved_run.figure("loss", height=321).layout.height == 321
    with pytest.raises(SpecError) as err:
        saved_run.figure("nope")
    message = str(err.value)
    assert "\n" not in message and "no figure 'nope'" in message and ", ".join(report) in message


def test_figures_display_offline(saved_run, monkeypatch):
    import superposition.views as views

    monkeypatch.setattr(views, "_plotlyjs_sent", False)
    first = saved_run.figure("loss")._repr_mimebundle_()
    second = saved_run.figure("features-nd")._repr_mimebundle_()
    assert "application/vnd.plotly.v1+json" in first and first["application/vnd.plotly.v1+json"]["data"]
    from plotly.offline import get_plotlyjs

    marker = get_plotlyjs()[:200]
    assert marker in first["text/html"] and marker not in second["text/html"]  # plotly.js inlined once per kernel
    for bundle in (first, second):
        assert _no_remote_script(bundle["text/html"]) and "cdn" not in bundle["text/html"].lower()[:2000]


def test_sae_folder_views(saved_run):
    spec = SaeSpec(steps=30, batch_size=64, log_every=10, resample_every=15, resample_window=5, eval_batch=256)
    runs_module.run_saes(saved_run, spec)
    sae = sp.load_sae(saved_run.path / "sae" / "relu")
    page = sae._repr_html_()
    _check_escaped(page)  # the run's name
    assert "relu setting(s)" in page and "mmcs_features" in page and str(sae.path) in page
    report = sae_figures(sae, saved_run)
    assert sae.figures() == [f.name for f in report] and "sae-cosines" in sae.figures()
    assert sae.figure("sae-cosines") == next(f.figure for f in report if f.name == "sae-cosines")
    with pytest.raises(SpecError, match=r"no figure 'x' \(available: sae-"):
        sae.figure("x")


def test_sweep_views(tmp_path):
    raw = _raw(sweep={"axes": {"model.d_hidden": [1, 2], "model.n_features": [3, 4]}, "report": {"threshold": 0.05}})
    spec = parse_spec(raw)
    sw.prepare(spec, tmp_path / "s")
    sw.execute(tmp_path / "s", workers=1, threads=1)
    sweep = sp.load_sweep(tmp_path / "s")
    page = sweep._repr_html_()
    _check_escaped(page)
    assert "4 point(s)" in page and "threshold: smallest" in page and str(sweep.path) in page
    report = sweep_figures(sweep.spec, sweep.plan, sweep.results, sweep.path)
    assert sweep.figures() == [f.name for f in report] == ["heatmap", "lines"]
    assert sweep.figure("heatmap") == report[0].figure
    with pytest.raises(SpecError, match=r"no figure 'x' \(available: heatmap, lines\)$"):
        sweep.figure("x")


def test_unbound_presenter_says_what_to_import():
    class Shown(Displayable):
        pass

    assert Shown()._repr_html_() is None  # Jupyter falls back to the plain repr
    with pytest.raises(PresenterMissing, match=r"^Shown has no figures yet: import superposition\.views first"):
        Shown().figure("loss")


def test_notebook_bar_is_a_bar_factory():
    bar = notebook_bar(total=3, desc="x", unit="step")
    bar.update(2)
    bar.set_postfix_str("loss 1")
    bar.close()


def test_interrupted_run_says_what_was_kept(tmp_path, monkeypatch):
    spec = parse_spec(_raw(name="tiny", train={"checkpoint_every": 20}))
    real = runs_module.save_checkpoint

    def save_then_stop(folder, state):
        real(folder, state)
        raise KeyboardInterrupt  # the notebook's stop button, right after the first checkpoint

    monkeypatch.setattr(runs_module, "save_checkpoint", save_then_stop)
    out = tmp_path / "r"
    with pytest.raises(runs_module.RunInterrupted) as err:
        sp.run(spec, out)
    assert isinstance(err.value, KeyboardInterrupt) and not out.exists()
    assert str(err.value) == (
        f"interrupted; checkpoint at step 20 kept; continue with: superposition.run(spec, {str(out)!r}, "
        f"resume=True) (or: superposition resume {out})"
    )
    monkeypatch.setattr(runs_module, "save_checkpoint", real)
    assert sp.run(spec, out, resume=True).path == out
    plain = parse_spec(_raw(name="tiny"))
    monkeypatch.setattr(runs_module, "train_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(runs_module.RunInterrupted, match="nothing kept .*train.checkpoint_every = N in the spec"):
        sp.run(plain, tmp_path / "other")
    assert not (tmp_path / "other").exists()
