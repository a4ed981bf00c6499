"""A run folder from a colleague is safe to open, and a report of a hostile spec runs nothing.

Untrusted folders: ``load_run`` reads JSON, safetensors and parquet only, checks config.json against the schema and
every tensor's name, shape and dtype (from a bounded read of the safetensors header, before the model is built),
refuses links out of the folder, non-regular files and absurd sizes, and ends in one RunFormatError. The CLI
commands that open runs (``report``, ``plot``) turn that into one line and exit code 2, writing nothing.

Hostile reports: names, descriptions, sweep labels and error messages full of markup are rendered; the page must
have exactly the markup of a benign twin, never contain a payload verbatim, and (in Chromium, with the page's
Content-Security-Policy bypassed so that escaping alone is tested) run none of it.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import struct
import zipfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from superposition.cli import app, main
from superposition.report import render_run
from superposition.runs import RunFormatError, load_run, read_safetensors_header, run
from superposition.spec import parse_spec

COMMANDS = {c.name or c.callback.__name__ for c in app.registered_commands}
TINY = {
    "model": {"kind": "relu-output", "n_features": 5, "d_hidden": 2},
    "data": {"feature_probability": 0.2},
    "task": {"importance": 0.8},
    "train": {"steps": 20, "batch_size": 16, "log_every": 10, "eval_batch": 64},
    "instances": {"model.kind": ["linear", "relu-output"], "data.feature_probability": [0.5, 0.05]},
}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "run"
    run(parse_spec({"name": "good", **TINY}), out)
    return out


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "link:" + os.readlink(p)
        elif p.is_file():  # size, time and the first MiB (one tamper is a sparse 1 GB file)
            with open(p, "rb") as fh:
                head = hashlib.sha256(fh.read(2**20)).hexdigest()
            st = p.stat()
            out[str(p.relative_to(folder))] = f"{st.st_size}:{st.st_mtime_ns}:{head}"
    return out


# -- tampering ------------------------------------------------------------------------------------------------------
def _pickle_that_touches(marker: Path) -> bytes:
    """A protocol-0 pickle whose loading calls open(marker, 'w'): proof that code ran if the marker appears."""
    return b"c__builtin__\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def _header_file(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def t_pickle(f: Path, marker: Path):
    (f / "model.safetensors").write_bytes(_pickle_that_touches(marker))
    return "model.safetensors"


def t_torch_zip(f: Path, marker: Path):
    # torch.save's format: a zip holding a pickle.
    with zipfile.ZipFile(f / "model.safetensors", "w") as z:
        z.writestr("archive/data.pkl", _pickle_that_touches(marker))
    return "model.safetensors"


def t_header_10gb(f: Path, marker: Path):
    (f / "model.safetensors").write_bytes(struct.pack("<Q", 10_000_000_000) + b'{"W": {}}' + bytes(64))
    return "10,000,000,000-byte header"


def t_header_beyond_file(f: Path, marker: Path):
    (f / "model.safetensors").write_bytes(struct.pack("<Q", 5000) + b"{}")
    return "header in a"


def t_header_not_json(f: Path, marker: Path):
    _header_file(f / "model.safetensors", b"\xff\xfe not json")
    return "header is not JSON"


def t_header_not_table(f: Path, marker: Path):
    _header_file(f / "model.safetensors", b"[1, 2, 3]")
    return "not a table"


def t_offsets_outside(f: Path, marker: Path):
    header = {"W": {"dtype": "F32", "shape": [1000, 1000, 1000], "data_offsets": [0, 4_000_000_000]}}
    _header_file(f / "model.safetensors", json.dumps(header).encode(), bytes(16))
    return "offsets"


def t_wrong_shape(f: Path, marker: Path):
    t = _tensors(f)
    t["W"] = torch.zeros(t["W"].shape[0], t["W"].shape[1] + 1, t["W"].shape[2])
    save_file(t, str(f / "model.safetensors"))
    return "W is F32"


def t_wrong_dtype(f: Path, marker: Path):
    t = _tensors(f)
    t["b_final"] = t["b_final"].double()
    save_file(t, str(f / "model.safetensors"))
    return "b_final is F64"


def t_missing_tensor(f: Path, marker: Path):
    t = _tensors(f)
    del t["b_final"]
    save_file(t, str(f / "model.safetensors"))
    return "missing ['b_final']"


def t_extra_tensor(f: Path, marker: Path):
    t = _tensors(f)
    t["__init__"] = torch.zeros(3)
    save_file(t, str(f / "model.safetensors"))
    return "unexpected ['__init__']"


def t_config_extra_top(f: Path, marker: Path):
    _edit_config(f, lambda c: c.update(on_load="__import__('os').system('touch /tmp/x')"))
    return "on_load"


def t_config_extra_spec(f: Path, marker: Path):
    _edit_config(f, lambda c: c["spec"]["model"].update(evil=1))
    return "model.evil"


def t_config_bad_type(f: Path, marker: Path):
    _edit_config(f, lambda c: c["spec"]["model"].update(n_features="5; rm -rf ~"))
    return "model.n_features"


def t_config_bad_meta(f: Path, marker: Path):
    _edit_config(f, lambda c: c.update(n_instances=7))
    return "n_instances"


def t_config_giant_model(f: Path, marker: Path):
    # Valid field values, but a model of terabytes against a weights file of a few hundred bytes: refused before
    # anything is allocated.
    def edit(c):
        c["spec"]["model"].update(n_features=1_000_000, d_hidden=1_000_000)

    _edit_config(f, edit)
    return "describes a model of about"


def t_config_not_json(f: Path, marker: Path):
    (f / "config.json").write_bytes(b"\x80\x81 not json {")
    return "config.json"


def t_config_deep(f: Path, marker: Path):
    (f / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    return "not valid JSON"


def t_config_huge(f: Path, marker: Path):
    with open(f / "config.json", "r+b") as fh:  # sparse: claims 1 GB without writing it
        fh.truncate(2**30)
    return "more than the"


def t_config_fifo(f: Path, marker: Path):
    (f / "config.json").unlink()
    os.mkfifo(f / "config.json")  # reading it would block for ever
    return "not a regular file"


def t_config_link_passwd(f: Path, marker: Path):
    (f / "config.json").unlink()
    (f / "config.json").symlink_to("/etc/passwd")
    return "outside the run folder"


def t_weights_link_passwd(f: Path, marker: Path):
    (f / "model.safetensors").unlink()
    (f / "model.safetensors").symlink_to("/etc/passwd")
    return "outside the run folder"


def t_table_link_out(f: Path, marker: Path):
    (f / "history.parquet").unlink()
    (f / "history.parquet").symlink_to("../../../../../../../../etc/hostname")
    return "outside the run folder"


def t_link_loop(f: Path, marker: Path):
    (f / "config.json").unlink()
    (f / "config.json").symlink_to("config.json")
    return "looping link"


def t_link_dangling(f: Path, marker: Path):
    (f / "instances.parquet").unlink()
    (f / "instances.parquet").symlink_to(f / "nowhere.parquet")
    return "broken or looping link"


def t_table_garbage(f: Path, marker: Path):
    (f / "history.parquet").write_bytes(b"PAR1" + os.urandom(64) + b"PAR1")
    return "not a valid parquet table"


def t_table_rows(f: Path, marker: Path):
    pd.read_parquet(f / "instances.parquet").iloc[:1].to_parquet(f / "instances.parquet")
    return "1 rows for 4 instances"


def t_table_columns(f: Path, marker: Path):
    pd.read_parquet(f / "history.parquet").drop(columns=["loss"]).to_parquet(f / "history.parquet")
    return "['loss'] are missing"


def t_file_missing(f: Path, marker: Path):
    (f / "model.safetensors").unlink()
    return "model.safetensors is missing"


TAMPERS = [v for k, v in sorted(globals().items()) if k.startswith("t_")]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__[2:] for t in TAMPERS])
def test_tampered_folder_is_refused_in_one_error(good_run, tmp_path, capsys, tamper):
    folder = tmp_path / "run"
    shutil.copytree(good_run, folder)
    marker = tmp_path / "code-ran"
    needle = tamper(folder, marker)
    with pytest.raises(RunFormatError) as info:
        load_run(folder)
    message = str(info.value)
    assert needle in message and len(message.splitlines()) == 1, message
    # The commands that open runs: one line, exit 2, nothing written into the folder.
    before = _digest(folder)
    opening = [["report", folder], ["plot", folder, "list"]] + ([["sae", folder]] if "sae" in COMMANDS else [])
    for argv in opening:
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert _digest(folder) == before
    assert not marker.exists(), "loading ran code from the folder"


def test_links_inside_the_folder_are_fine(good_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(good_run, folder)
    (folder / "config.json").rename(folder / "config.real.json")
    (folder / "config.json").symlink_to("config.real.json")
    loaded = load_run(folder)
    assert loaded.spec.name == "good"


def test_header_reader_agrees_with_safetensors(good_run):
    header = read_safetensors_header(good_run / "model.safetensors")
    tensors = _tensors(good_run)
    assert set(header.tensors) == set(tensors)
    for name, info in header.tensors.items():
        assert info.shape == tuple(tensors[name].shape)
        assert info.end - info.start == tensors[name].numel() * tensors[name].element_size()


# -- hostile reports ------------------------------------------------------------------------------------------------
PAYLOADS = [
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="window.__pwned=2">',
    "'><svg onload=window.__pwned=3>",
    "</title><script>window.__pwned=4</script>",
    "</style></pre></p><script>window.__pwned=5</script>",
    '<iframe srcdoc="<script>parent.__pwned=6</script>"></iframe>',
    '<a href="javascript:window.__pwned=7">click</a>',
    "<!-- --><script>window.__pwned=8</script><![CDATA[ ]]>",
    "\u202eevil\u202c \u2028 zero\u200bwidth \ufeff \U0001f642 \u4e2d\u6587 \x00 end",
]
NAME = PAYLOADS[0] + PAYLOADS[1] + " \u4e2d\u6587"
DESCRIPTION = "\n".join(PAYLOADS)


class _Markup(HTMLParser):
    """The markup of a page: tags with their attribute names, scripts with their nonce, attribute values."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self.script_nonces: list[str | None] = []
        self.values: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags[(tag, tuple(sorted(a for a, _ in attrs)))] += 1
        if tag == "script":
            self.script_nonces.append(dict(attrs).get("nonce"))
        self.values.extend((a, v or "") for a, v in attrs)


def _markup(page: str) -> _Markup:
    parser = _Markup()
    parser.feed(page)
    parser.close()
    return parser


def _assert_inert(page: str) -> None:
    """No payload verbatim, no event handler attribute, no javascript: URL, every script carries the page nonce."""
    for p in PAYLOADS:
        for piece in p.split("\n"):
            if any(c in piece for c in "<>\"'"):
                assert piece not in page, f"payload {piece!r} is in the page verbatim"
    m = _markup(page)
    assert not [a for (_, attrs) in m.tags for a in attrs if a.startswith("on")]
    assert not [v for _, v in m.values if v.strip().lower().startswith("javascript:")]
    nonces = set(m.script_nonces)
    assert len(nonces) == 1 and None not in nonces
    assert not {"img", "svg", "iframe", "object", "embed", "form", "base", "link"} & {t for t, _ in m.tags}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run"
    return run(parse_spec({"name": NAME, "description": DESCRIPTION, **TINY}), out)


def test_run_report_of_a_hostile_spec_has_the_markup_of_a_benign_one(hostile_run):
    page = (hostile_run.path / "report.html").read_text(encoding="utf-8")
    _assert_inert(page)
    # The same run under benign strings (one line per payload, so the paragraphs match) renders the same markup.
    benign_spec = hostile_run.spec.model_copy(
        update={"name": "benign", "description": "\n".join(f"line {i}" for i in range(len(PAYLOADS)))}
    )
    benign = render_run(type(hostile_run)(**{**vars(hostile_run), "spec": benign_spec}))
    assert _markup(page).tags == _markup(benign).tags
    assert f"<title>{html.escape(NAME)}</title>" in page
    assert html.escape(PAYLOADS[5]) in page


@pytest.fixture(scope="module")
def hostile_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile-sweep")
    spec = {
        "name": NAME,
        "description": DESCRIPTION,
        **{k: v for k, v in TINY.items() if k != "instances"},
        "sweep": {
            # Labels are free text; an invalid axis value puts a hostile string into an error message.
            "axes": {"model.d_hidden": [2, 3], "model.kind": ["relu-output", PAYLOADS[2]]},
            "labels": {"variant": [PAYLOADS[0], PAYLOADS[3]]},
            "zip": [["model.d_hidden", "variant"]],
        },
    }
    (folder / "s.json").write_text(json.dumps(spec))
    torch.set_num_threads(1)
    assert main(["sweep", str(folder / "s.json"), "--out", str(folder / "out"), "--workers", "1", "--quiet"]) == 0
    return folder / "out"


def test_sweep_report_with_hostile_labels_and_errors_is_inert(hostile_sweep):
    results = pd.read_parquet(hostile_sweep / "results.parquet")
    assert set(results["variant"]) == {PAYLOADS[0], PAYLOADS[3]}
    assert results["error"].str.contains("__pwned=3", regex=False).sum() == 2  # the invalid points' errors
    page = (hostile_sweep / "report.html").read_text(encoding="utf-8")
    _assert_inert(page)
    assert html.escape(PAYLOADS[3]) in page and "__pwned=3" in page


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.browser
def test_hostile_reports_run_nothing_in_chromium(hostile_run, hostile_sweep):
    if not CHROMIUM.is_file():
        pytest.skip("needs /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    outside, dialogs = [], []

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            # bypass_csp: the page's CSP would block injected scripts anyway; without it, escaping alone must hold.
            context = browser.new_context(offline=True, bypass_csp=True)
            context.route("**/*", route)
            page = context.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            for report, title in ((hostile_run.path, NAME), (hostile_sweep, f"sweep: {NAME}")):
                page.goto((report / "report.html").resolve().as_uri(), wait_until="load")
                page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length > 0")
                assert page.evaluate("typeof window.__pwned") == "undefined"
                assert (
                    page.evaluate("document.querySelectorAll('iframe, [onerror], [onload], [href^=javascript]').length")
                    == 0
                )
                assert page.title() == title
                assert page.locator("h1").inner_text() == title
                assert PAYLOADS[5] in page.locator("body").inner_text()  # shown as text
        finally:
            browser.close()
    assert dialogs == [] and outside == []


# -- never destroy what is not ours ------------------------------------------------------------------------------------
# A command replaces or deletes only a path it recognises as its own (a run, SAE or sweep folder of this tool, or its
# own hidden working folder); anything else is refused in one line naming the path, before any work, untouched.
SAFE_SPEC = {
    "name": "safe",
    **TINY,
    "train": {**TINY["train"], "checkpoint_every": 10},
    "sae": {"steps": 20, "batch_size": 32, "log_every": 10},
}


def _user_stuff(kind: str, path: Path) -> None:
    """Something a user owns, in the place a command would write."""
    if kind == "notes":  # the thesis folder
        path.mkdir()
        (path / "thesis.txt").write_text("years of work")
    elif kind == "file":
        path.write_text("a plain file")
    elif kind == "fake-config":  # a config.json that is not ours
        path.mkdir()
        (path / "config.json").write_text('{"learning_rate": 3}')
    elif kind == "run-plus-user-file":  # a real run folder in which the user keeps a file of their own
        shutil.copytree(_safe_run(path.parent), path)
        (path / "my-analysis.ipynb").write_text("{}")
    elif kind == "link":
        target = path.parent / "elsewhere"
        target.mkdir(exist_ok=True)
        (target / "keep.txt").write_text("keep")
        path.symlink_to(target)


def _safe_run(where: Path) -> Path:
    out = where / "_a_real_run"
    if not out.exists():
        run(parse_spec({k: v for k, v in SAFE_SPEC.items() if k != "sae"}), out)
    return out


def _tree(path: Path) -> dict[str, str]:
    if path.is_symlink() or path.is_file():
        return {"": path.read_text() if path.is_file() else os.readlink(path)}
    return _digest(path)


@pytest.fixture
def spec_file(tmp_path) -> Path:
    f = tmp_path / "safe.json"
    f.write_text(json.dumps({k: v for k, v in SAFE_SPEC.items() if k != "sae"}))
    return f


USER_KINDS = ["notes", "file", "fake-config", "run-plus-user-file", "link"]


@pytest.mark.parametrize("kind", USER_KINDS)
def test_run_overwrite_refuses_what_is_not_a_run(tmp_path, capsys, spec_file, kind):
    target = tmp_path / "out"
    _user_stuff(kind, target)
    before = _tree(target)
    capsys.readouterr()
    assert main(["run", str(spec_file), "--out", str(target), "--overwrite"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "refusing to replace it" in lines[0], captured.err
    assert captured.out == "", "the refusal must come before 'training ...'"
    assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    "sibling", [".out.partial", ".out.partial.new", ".out.old", ".out.partial.trash", ".out.old.trash"]
)
def test_hidden_siblings_that_are_not_ours_are_refused(tmp_path, capsys, spec_file, sibling):
    hidden = tmp_path / sibling
    _user_stuff("notes", hidden)
    before = _tree(hidden)
    capsys.readouterr()
    assert main(["run", str(spec_file), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(hidden) in err and "refusing to delete it" in err and "thesis.txt" in err, err
    assert _tree(hidden) == before and not (tmp_path / "out").exists()


def test_a_real_run_is_still_replaced_and_its_old_copy_and_leftovers_cleared(tmp_path, spec_file, capsys):
    target = tmp_path / "out"
    assert main(["run", str(spec_file), "--out", str(target), "--quiet"]) == 0
    first = (target / "model.safetensors").read_bytes()
    # leftovers of a killed earlier overwrite: our own, so they are cleared
    shutil.copytree(target, tmp_path / ".out.old")
    (target / "report.html").rename(target / ".report.html.tmp")  # a report rewrite killed mid-way
    assert main(["run", str(spec_file), "--out", str(target), "--overwrite", "--quiet"]) == 0
    assert (target / "model.safetensors").read_bytes() == first  # same spec, same weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "safe.json"]
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["config.json", "model.safetensors", "history.parquet", "instances.parquet", "report.html"]
    )


def test_every_file_of_a_folder_has_the_same_umask_mode(tmp_path, spec_file):
    old = os.umask(0o027)
    try:
        assert main(["run", str(spec_file), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o640}, modes


def test_resume_refuses_to_replace_what_is_not_a_run(tmp_path, capsys, monkeypatch):
    import superposition.runs as runs

    spec = parse_spec({k: v for k, v in SAFE_SPEC.items() if k != "sae"})
    target = tmp_path / "out"

    def crash(folder, state):
        real(folder, state)
        raise KeyboardInterrupt

    real = runs.save_checkpoint
    monkeypatch.setattr(runs, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        run(spec, target)
    monkeypatch.setattr(runs, "save_checkpoint", real)
    _user_stuff("notes", target)  # the user puts their own folder where the run was going
    before, partial = _tree(target), _tree(tmp_path / ".out.partial")
    capsys.readouterr()
    assert main(["resume", str(target)]) == 2
    err = capsys.readouterr().err
    assert "refusing to replace it" in err and "thesis.txt" in err, err
    assert _tree(target) == before and _tree(tmp_path / ".out.partial") == partial


@pytest.mark.parametrize("kind", ["notes", "file", "fake-config"])
def test_sae_overwrite_refuses_what_is_not_an_sae_folder(tmp_path, capsys, kind):
    folder = tmp_path / "r"
    shutil.copytree(_safe_run(tmp_path), folder)
    (folder / "sae").mkdir()
    target = folder / "sae" / "relu"
    _user_stuff(kind, target)
    before = _tree(folder)
    capsys.readouterr()
    assert main(["sae", str(folder), "--set", "steps=20", "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "refusing to replace it" in err, err
    assert _tree(folder) == before


def test_sae_overwrite_replaces_its_own_folder(tmp_path, capsys):
    folder = tmp_path / "r"
    shutil.copytree(_safe_run(tmp_path), folder)
    argv = ["sae", str(folder), "--set", "steps=20", "--set", "batch_size=32", "--quiet"]
    assert main(argv) == 0
    first = (folder / "sae" / "relu" / "model.safetensors").read_bytes()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert (folder / "sae" / "relu" / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in (folder / "sae").iterdir()) == ["relu"]


def test_plot_replaces_a_file_only_when_asked(tmp_path, capsys):
    folder = _safe_run(tmp_path)
    out = tmp_path / "fig.html"
    out.write_text("my own figure")
    capsys.readouterr()
    assert main(["plot", str(folder), "features-nd", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "my own figure"
    (tmp_path / "dir.html").mkdir()
    assert main(["plot", str(folder), "features-nd", "--out", str(tmp_path / "dir.html"), "--overwrite"]) == 2
    assert "a folder" in capsys.readouterr().err
    assert main(["plot", str(folder), "features-nd", "--out", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("<!doctype html>") and (out.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_interrupt_names_what_was_kept(tmp_path, capsys, monkeypatch, spec_file):
    import superposition.runs as runs

    real = runs.save_checkpoint

    def crash(folder, state):
        real(folder, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_checkpoint", crash)
    target = tmp_path / "out"
    assert main(["run", str(spec_file), "--out", str(target), "--quiet"]) == 130
    line = capsys.readouterr().err.strip()
    assert line == f"error: interrupted; checkpoint at step 10 kept; continue with: superposition resume {target}"
    # without checkpoints: says that nothing was kept, and why
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(TINY))

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train_model", stop)
    assert main(["run", str(plain), "--out", str(tmp_path / "p"), "--quiet"]) == 130
    line = capsys.readouterr().err.strip()
    assert "nothing kept" in line and "train.checkpoint_every" in line, line


def test_a_sweep_folder_opened_as_a_run_says_what_to_call(tmp_path, capsys):
    folder = tmp_path / "sw"
    folder.mkdir()
    (folder / "sweep.json").write_text("{}")
    with pytest.raises(RunFormatError, match="a sweep folder.*load_sweep.*superposition report"):
        load_run(folder)


def test_messages_name_the_folder_asked_for_not_the_working_folder(tmp_path, capsys, spec_file, monkeypatch):
    import superposition.folder as folder

    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(folder.os, "access", lambda path, mode: Path(path) != ro)  # root may write anywhere
    assert main(["run", str(spec_file), "--out", str(ro / "out")]) == 2
    captured = capsys.readouterr()
    assert ".partial" not in captured.err and str(ro / "out") in captured.err and captured.out == ""
    assert list(ro.iterdir()) == []
    # an OS error about a working folder names the folder the user asked for
    assert folder.user_path(tmp_path / ".out.partial.new" / "spec.json") == tmp_path / "out"
    assert folder.user_path(tmp_path / "sae" / ".relu.partial") == tmp_path / "sae" / "relu"


def test_sae_refuses_to_write_through_a_linked_sae_folder(tmp_path, capsys):
    folder = tmp_path / "r"
    shutil.copytree(_safe_run(tmp_path), folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / "sae").symlink_to(elsewhere)
    capsys.readouterr()
    assert main(["sae", str(folder), "--set", "steps=20", "--quiet"]) == 2
    assert "refusing to write through it" in capsys.readouterr().err and list(elsewhere.iterdir()) == []
