"""The claims each preset must reproduce (superposition.claims) and the reproduce loop over them."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from superposition import claims
from superposition.claims import NOT_GRADED, RULES, Row, claim_line, grade, has_claim, is_full_preset, verdict_line
from superposition.errors import SpecError
from superposition.reproduce import BEGIN, END, HEADER, reproduce
from superposition.runs import train
from superposition.spec import load_spec, preset_names

VERDICTS = ("yes", "partly", "no")


def test_every_rule_names_a_preset():
    names = set(preset_names())
    assert RULES and set(RULES) <= names, set(RULES) - names
    assert all(callable(rule) for rule in RULES.values())
    assert has_claim("pentagon") and not has_claim("demo") and not has_claim("no-such-preset")
    with pytest.raises(SpecError, match="no claim for 'demo'"):
        grade("demo", None)


@pytest.mark.parametrize("name", sorted(RULES))
def test_is_full_preset_only_for_the_full_unmodified_spec(name):
    assert is_full_preset(name, load_spec(name))
    assert is_full_preset(name, load_spec(name, ['device="auto"']))  # --device moves it, it stays the preset
    assert not is_full_preset(name, load_spec(name, quick=True))
    assert not is_full_preset(name, load_spec(name, [f"seed={load_spec(name).seed + 1}"]))
    if name == "relu-vs-linear":
        assert not is_full_preset(name, load_spec(name, ["train.steps=7"]))
    other = "demo" if name != "demo" else "pentagon"
    assert not is_full_preset(other, load_spec(name))
    assert not is_full_preset("no-such-preset", load_spec(name))


def test_claims_sit_below_runs_sweep_report_plots_and_cli():
    code = (
        "import sys, superposition.claims\n"
        "bad = [m for m in ('runs', 'sweep', 'report', 'plots', 'cli') if f'superposition.{m}' in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_claims_and_sweep_share_one_threshold_table():
    from superposition import sweep as sw
    from superposition.claims import seeds

    assert seeds.threshold_table is sw.threshold_table  # one implementation (superposition.thresholds)


def test_grade_a_short_relu_vs_linear_run():
    spec = load_spec("relu-vs-linear", quick=True)
    run = train(spec)
    row = claims.RULES["relu-vs-linear"](run)
    assert isinstance(row, Row) and row == grade("relu-vs-linear", run)
    assert row.measured.startswith("features with ‖W_i‖ > 0.5 at p = ") and "linear 5, 5, 5" in row.measured
    assert row.source == "ReLU ≈ 5, 7, 9, 10, 11, 12, 12; linear 5 at every p"
    assert row.verdict.startswith(VERDICTS) and "ReLU within ±1 of the paper at " in row.verdict
    line = verdict_line("relu-vs-linear", run)
    assert line.startswith(f"reproduced? {row.verdict} — measured: {row.measured}") and line.endswith(row.source)
    assert "\n" not in line
    # what `run` ends with: quick -> not graded, the full spec -> the verdict, no rule -> nothing
    assert claim_line("relu-vs-linear", spec, run) == NOT_GRADED
    assert claim_line("relu-vs-linear", load_spec("relu-vs-linear"), run) == line
    assert claim_line("demo", load_spec("demo"), run) is None


def test_reproduce_then_collect_gives_the_same_rows(tmp_path):
    names = ["pentagon", "relu-vs-linear"]
    md = tmp_path / "RESULTS.md"
    original = f"# Results\n\n{BEGIN}\n{HEADER}\n| other | `x` | 1 s | m | s | yes |\n{END}\nafter\n"
    md.write_text(original, encoding="utf-8")
    messages: list[str] = []
    rows = reproduce(names, out=tmp_path / "r", quick=True, results_md=md, progress=messages.append)
    assert list(rows) == names and all(r.measured and r.source for r in rows.values())
    assert all(r.verdict.startswith(VERDICTS) for r in rows.values())
    assert any("training pentagon" in m for m in messages) and any(m.startswith("relu-vs-linear: ") for m in messages)
    assert (tmp_path / "r" / "quick" / "pentagon" / "config.json").is_file()
    again = reproduce(names, out=tmp_path / "r", collect=True, quick=True, results_md=md)
    assert again == rows
    assert md.read_text(encoding="utf-8") == original  # a quick pass never writes RESULTS.md
    # A full pass (here: the same folders, collected) rewrites only its own rows, keeping the others'.
    shutil.copytree(tmp_path / "r" / "quick", tmp_path / "r" / "full")
    messages.clear()
    assert reproduce(names, out=tmp_path / "r", collect=True, results_md=md, progress=messages.append) == rows
    text = md.read_text(encoding="utf-8")
    assert "| other | `x` | 1 s | m | s | yes |" in text and text.endswith(f"{END}\nafter\n")
    for name in names:
        (line,) = [t for t in text.splitlines() if t.startswith(f"| {name} | `superposition run {name}` | ")]
        assert line.endswith(f" | {rows[name].verdict} |") and "CPU thread" in line
    assert messages[-1] == f"wrote {md}"


def test_reproduce_refuses_a_preset_without_a_rule(tmp_path):
    with pytest.raises(SpecError, match="no extractor for demo"):
        reproduce(["demo"], out=tmp_path, quick=True)
    assert not any(tmp_path.iterdir())


def test_pentagon_rule_reads_the_geometry():
    """The rule is computed from the numbers: a hand-made pentagon passes, a collapsed one does not."""
    import torch

    from superposition.claims.paper import _angles

    theta = np.radians(np.arange(5) * 72.0)
    W = torch.tensor(np.stack([np.cos(theta), np.sin(theta)]), dtype=torch.float32)
    np.testing.assert_allclose(_angles(W), 72.0, atol=1e-4)
    assert len(_angles(W * 0.1)) == 0


# -- the verdict from the command line ---------------------------------------------------------------------------------
def test_run_prints_the_verdict_of_a_full_preset_and_not_graded_otherwise(tmp_path, capsys):
    import html

    from superposition.cli import main

    assert main(["run", "pentagon", "--out", str(tmp_path / "full")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("reproduced? yes") and "source:" in last, last
    assert html.escape(last, quote=False) in (tmp_path / "full" / "report.html").read_text(encoding="utf-8")
    assert main(["run", "pentagon", "--quick", "--out", str(tmp_path / "quick")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "reproduced? not graded (quick/modified)"
    assert main(["run", "demo", "--quick", "--out", str(tmp_path / "demo"), "--set", "train.steps=20"]) == 0
    assert "reproduced?" not in capsys.readouterr().out  # demo has no claim


def test_reproduce_command_trains_then_rereads_the_same_rows(tmp_path, capsys):
    from superposition.cli import main

    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    argv = ["reproduce", "pentagon", "relu-vs-linear", "--quick", "--out", str(tmp_path / "r"), "--results"]
    assert main([*argv, str(results)]) == 0
    trained = capsys.readouterr().out
    assert main([*argv, str(results), "--collect"]) == 0
    assert capsys.readouterr().out == trained and trained.count("reproduced? ") == 2
    assert results.read_text() == "# Results\n"  # a quick pass never writes the table
    assert main(["reproduce", "demo", "--collect", "--out", str(tmp_path / "r")]) == 2


def test_reproduce_refuses_before_writing_anything(tmp_path, capsys):
    from superposition.cli import main

    assert main(["reproduce", "pentagon", "--collect", "--out", str(tmp_path / "none")]) == 2
    assert "no finished folder to re-read" in capsys.readouterr().err
    assert main(["reproduce", "pentagon", "--quick", "--device", "xyz", "--out", str(tmp_path / "bad")]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "device" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- best of seeds -----------------------------------------------------------------------------------------------------
SEEDED_RULES = ["anticorrelated", "correlated", "pentagon", "phase-diagram", "phase-diagram-3x2"]


@pytest.mark.parametrize("name", SEEDED_RULES)
def test_seeded_rules_read_the_best_seed_through_best_of_seeds(name, monkeypatch):
    """Each rule picks its best seed with superposition.best.best_of_seeds (no ad-hoc pick) and states the per-seed
    rate beside it. A short quick run (300 steps): the mechanism is checked here, the outcomes in test_presets."""
    import re

    import torch

    from superposition import best
    from superposition.runs import train

    calls = []
    real = best.best_of_seeds

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(load_spec(name, ["train.steps=300"], quick=True))
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(best, "best_of_seeds", spy)
    row = grade(name, run)
    assert calls, "the rule did not read best.best_of_seeds"
    table = calls[-1]
    assert {"n_seeds", "n_ranked", "n_true"} <= set(table.columns)
    assert int(table["n_seeds"].sum()) == len(run.instances)  # every instance is some setting's seed
    per_seed = re.search(r"per seed (\d+)/(\d+)", row.measured)
    assert per_seed is not None, row.measured
    if name == "pentagon":  # the per-seed rate of the sparsest probability
        assert int(per_seed[2]) == int(table["n_seeds"].iloc[int(table["p"].idxmin())])
    else:
        assert (int(per_seed[1]), int(per_seed[2])) == (int(table["n_true"].sum()), len(run.instances))
    if name == "anticorrelated":  # the per-seed count is the instances' own: both pairs antipodal
        assert int(per_seed[1]) == int((run.instances["cos_anti"] < -0.9).sum())
        assert table["n_seeds"].tolist() == [2] * len(table)
    if name.startswith("phase-diagram"):
        from superposition import phase, theory

        emp = phase.empirical_diagram(run)  # one pick: the diagram's best instance is the table's
        assert (table["instance"].to_numpy() == emp.best_instance[table["row"], table["col"]]).all()
        g, spec = emp.grid, run.spec
        ana = theory.analytic_phase_diagram(
            spec.model.n_features, spec.model.d_hidden, g.importances, g.probabilities, "paper"
        )
        agree = phase.agreement(emp, ana)[table["row"], table["col"]]
        assert (agree == table["agrees"].to_numpy()).all()
        assert f"on {int(agree.sum())}/{len(table)} cells" in row.measured
