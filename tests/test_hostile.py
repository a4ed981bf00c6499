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
