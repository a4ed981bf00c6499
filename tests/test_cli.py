"""The command line: bad input is one line on stderr and exit code 2, and nothing is written."""

import subprocess
import sys

import pytest

from superposition.cli import main


def _run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "no-such-preset"], "neither a spec file nor a preset"),
        (["run", "missing.toml"], "no such spec file"),
        (["run", "demo", "--set", "model.n_features=-3"], "model.n_features"),
        (["run", "demo", "--set", "model.kind=cnn"], "'linear'"),
        (["run", "demo", "--set", "model.colour=red"], "model.colour"),
        (["run", "demo", "--set", "data.feature_probability=1.5"], "data.feature_probability"),
        (["run", "demo", "--set", "data.kind=anticorrelated", "--set", "data.feature_probability=0.7"], "p <= 0.5"),
        (["run", "demo", "--set", "model.d_hidden"], "section.field=value"),
        (["run", "demo", "--set", "=3"], "section.field=value"),
        (["run", "demo", "--set", "train.steps=ten"], "train.steps"),
        (["show", "nope"], "unknown preset"),
        (["frobnicate"], "No such command"),
        (["run"], "Missing argument"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *args, *(["--out", "r"] if args[0] == "run" and len(args) > 1 else []))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert needle in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_bad_toml_file(capsys, tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text("[model\nkind = 3")
    code, _, err = _run(capsys, "run", str(spec), "--out", str(tmp_path / "r"))
    assert code == 2 and "not valid TOML" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_existing_out_needs_overwrite(capsys, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = _run(capsys, "run", "demo", "--quick", "--quiet", "--out", str(out))
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_presets_show_version(capsys):
    code, out, _ = _run(capsys, "presets")
    assert code == 0 and "relu-vs-linear" in out and "demo" in out
    code, out, _ = _run(capsys, "show", "relu-vs-linear")
    assert code == 0 and "n_features = 20" in out
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.startswith("superposition ")


def test_console_script_runs_and_reports_error_without_traceback(tmp_path):
    exe = [sys.executable, "-m", "superposition.cli"]
    done = subprocess.run([*exe, "run", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_run_writes_a_loadable_folder(capsys, tmp_path):
    from superposition.runs import load_run

    out = tmp_path / "r"
    code, stdout, _ = _run(
        capsys, "run", "demo", "--out", str(out), "--set", "train.steps=60", "--set", "train.eval_batch=256"
    )
    assert code == 0 and "represented features" in stdout
    run = load_run(out)
    assert run.spec.train.steps == 60 and len(run.instances) == 8


def test_unknown_preset_suggests_the_closest_name(capsys):
    code, out, err = _run(capsys, "run", "dmeo")
    assert code == 2 and out == ""
    assert err == "error: 'dmeo' is neither a spec file nor a preset (did you mean 'demo'?)\n"


def test_quick_prints_one_line_of_what_it_shrank_unless_quiet(capsys, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\n[train]\nsteps = 2000\n[sweep.axes]\n"model.d_hidden" = [2, 3, 4]\n')
    code, out, _ = _run(capsys, "sweep", str(spec), "--quick", "--dry-run", "--out", str(tmp_path / "o"))
    assert code == 0
    assert out.splitlines()[0] == "quick: train.steps 2000 -> 300, sweep.axes.model.d_hidden 3 -> 2 values"
    assert out.count("quick:") == 1
    code, out, _ = _run(capsys, "sweep", str(spec), "--quick", "--dry-run", "--quiet", "--out", str(tmp_path / "o"))
    assert code == 0 and "quick:" not in out
    code, out, _ = _run(capsys, "sweep", str(spec), "--dry-run", "--out", str(tmp_path / "o"))
    assert code == 0 and "quick:" not in out


def test_progress_off_a_terminal_is_one_line_every_few_seconds(capsys, monkeypatch):
    import superposition.cli as cli
    import superposition.progress as progress

    clock = iter(range(0, 1000, 4))  # every update is 4 s after the last
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.LineBar(total=10, desc="demo [eager]", unit="step")
    bar.set_postfix_str("loss=0.5")
    for _ in range(10):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3  # at 12, 24 and 36 s: no more than one line per 10 s
    assert lines[0] == "demo [eager]: step 3/10 (30%), loss=0.5, 12 s, ETA 28 s"
    assert cli._bars(quiet=True) is None and cli._bars(quiet=False) is progress.LineBar  # stderr: no terminal
