"""The HTML report: self-contained (plotly.js once, no network), every string escaped, and it renders in a browser."""

from __future__ import annotations

import html
import re
import struct
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from superposition import plots
from superposition.cli import main
from superposition.report import Section, figure_image, render_page, render_run, table_html
from superposition.runs import load_run, run
from superposition.spec import parse_spec

HOSTILE = "<script>alert(1)</script>"
HOSTILE_TEXT = "<img src=x onerror=alert(2)> look for </pre><script>alert(3)</script>"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    spec = parse_spec(
        {
            "name": HOSTILE,
            "description": HOSTILE_TEXT,
            "model": {"kind": "relu-output", "n_features": 4, "d_hidden": 2},
            "task": {"importance": 0.8},
            "train": {"steps": 60, "batch_size": 64, "log_every": 20, "eval_batch": 256},
            "instances": {"data.feature_probability": [1.0, 0.3, 0.05]},
        }
    )
    return run(spec, tmp_path_factory.mktemp("runs") / "hostile")


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- the page ---------------------------------------------------------------------------------------------------------
def test_plotly_js_is_embedded_once_and_only_with_figures():
    js = get_plotlyjs()
    figs = [go.Figure(go.Scatter(x=[1, 2], y=[3, 4])) for _ in range(3)]
    page = render_page("t", [Section("a", figures=figs[:2]), Section("b", figures=figs[2:])])
    assert page.count(js[:400]) == 1
    assert page.count('class="plotly-graph-div"') == 3
    assert get_plotlyjs()[:400] not in render_page("t", [Section("a", paragraphs=["no figures"])])


def test_every_script_carries_the_page_nonce_and_the_csp_forbids_the_network():
    page = render_page(
        "t", [Section("a", figures=[go.Figure(go.Bar(x=[1], y=[1]))], tables=[pd.DataFrame({"a": [1]})])]
    )
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert "default-src 'none'" in csp and "connect-src 'none'" in csp
    tags = re.findall(r"<script\b[^>]*>", page)
    assert len(tags) == 3  # plotly.js, the figure, the table sorter
    assert all(f'nonce="{nonce}"' in t for t in tags)
    assert "src=" not in "".join(tags)  # nothing is loaded from anywhere
    assert render_page("t", []) != render_page("t", [])  # a fresh nonce per page


def test_strings_are_escaped_everywhere():
    df = pd.DataFrame({HOSTILE: [HOSTILE], "x": [1.23456789]})
    page = render_page(
        HOSTILE,
        [
            Section(
                HOSTILE,
                paragraphs=[HOSTILE_TEXT],
                tables=[df],
                preformatted=HOSTILE,
                definitions=[(HOSTILE, HOSTILE_TEXT)],
            )
        ],
    )
    assert HOSTILE not in page and "<img" not in page and "alert(3)</script>" not in page
    assert page.count(html.escape(HOSTILE)) >= 6  # title, h1, toc-less h2, table header and cell, pre, dt
    assert "1.235" in table_html(df)  # floats to 4 significant digits


def test_run_report_has_every_part(hostile_run):
    page = (hostile_run.path / "report.html").read_text(encoding="utf-8")
    figures = plots.figures_for_run(hostile_run)
    assert page.count('class="plotly-graph-div"') == len(figures) >= 5
    for heading in ["What to look for", "Run", "Instances", "Features", "Spec", *[f.title for f in figures]]:
        assert f">{html.escape(heading)}</h2>" in page
    assert html.escape(HOSTILE_TEXT) in page  # the description is the "what to look for" text
    assert HOSTILE not in page and "<img" not in page
    # every instance row and its metric columns are in the table
    for col in ["loss", "n_represented", "superposition", "dims_per_feature"]:
        assert f"<th>{col}</th>" in page
    assert page.count("<tr>") >= 3 + 3 * 4  # 3 instance rows, 12 feature rows (plus headers)
    size = len(page.encode())
    assert len(get_plotlyjs()) < size < len(get_plotlyjs()) + 1_500_000  # the figures add well under 1.5 MB


def test_render_run_matches_the_saved_report_structure(hostile_run):
    again = render_run(load_run(hostile_run.path))
    saved = (hostile_run.path / "report.html").read_text(encoding="utf-8")
    strip = lambda s: re.sub(r"nonce-?[=\"']*[A-Za-z0-9_-]{20,}", "", s)  # noqa: E731
    assert strip(again).count("<h2") == strip(saved).count("<h2")


# -- the commands -----------------------------------------------------------------------------------------------------
def test_report_command_rebuilds_the_page(hostile_run, capsys):
    path = hostile_run.path / "report.html"
    path.write_text("stale")
    code, out, err = _cli(capsys, "report", hostile_run.path)
    assert code == 0 and err == "" and "wrote" in out
    assert path.read_text(encoding="utf-8").startswith("<!doctype html>")
    assert not [p.name for p in hostile_run.path.iterdir() if p.name.endswith(".tmp")]


def test_report_command_on_a_missing_folder_is_one_line(tmp_path, capsys):
    code, _, err = _cli(capsys, "report", tmp_path / "nope")
    assert code == 2 and err.count("\n") == 1 and "no such run folder" in err


def test_plot_command_lists_and_exports_html(hostile_run, tmp_path, capsys):
    code, out, _ = _cli(capsys, "plot", hostile_run.path, "list")
    names = out.split()
    assert code == 0 and names == [f.name for f in plots.figures_for_run(hostile_run)]
    target = tmp_path / "fig.html"
    code, out, err = _cli(capsys, "plot", hostile_run.path, "features-2d", "--out", target)
    assert code == 0, err
    page = target.read_text(encoding="utf-8")
    assert page.count(get_plotlyjs()[:400]) == 1 and "https://cdn" not in page.split("<body>")[0][-2000:]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["no-such-figure"], "no figure 'no-such-figure'"),
        (["loss", "--out", "fig.txt"], "unknown extension"),
        (["loss", "--out", "missing/fig.png"], "does not exist"),
    ],
)
def test_plot_command_bad_input(hostile_run, tmp_path, monkeypatch, capsys, extra, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "plot", hostile_run.path, *extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err
    assert not list(tmp_path.iterdir())


def test_png_export_without_a_browser_says_so_in_one_line(hostile_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium"))
    code, _, err = _cli(capsys, "plot", hostile_run.path, "loss", "--out", tmp_path / "loss.png")
    assert code == 2 and err.count("\n") == 1 and "needs a Chromium" in err
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's /usr/bin/chromium")
def test_png_export_offline(hostile_run, tmp_path, capsys):
    target = tmp_path / "loss.png"
    code, _, err = _cli(
        capsys, "plot", hostile_run.path, "loss", "--out", target, "--width", 400, "--height", 300, "--scale", 1
    )
    assert code == 0, err
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (400, 300)
    svg = figure_image(plots.features_nd([[1.0, 0.5]], [[0.0, 1.0]], ["x"]), "svg", width=300, height=200)
    assert svg.lstrip().startswith(b"<svg") and b"feature" in svg


# -- the browser ------------------------------------------------------------------------------------------------------
@pytest.mark.browser
def test_report_renders_offline_in_chromium_and_runs_nothing_hostile(hostile_run):
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    report = (hostile_run.path / "report.html").resolve()
    n_figures = len(plots.figures_for_run(hostile_run))
    requests: list[str] = []
    blocked: list[str] = []
    dialogs: list[str] = []
    errors: list[str] = []

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            context = browser.new_context(offline=True)
            context.route("**/*", route)
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri())
            page.wait_for_function(
                "n => document.querySelectorAll('.plotly-graph-div .main-svg').length >= 2 * n",
                arg=n_figures,
                timeout=60_000,
            )
            # plotly draws two SVG layers per figure (the plot and the hover/infolayer)
            assert page.locator(".plotly-graph-div").count() == n_figures
            assert page.locator(".main-svg").count() >= 2 * n_figures
            assert page.locator(".plotly-graph-div .bars, .plotly-graph-div .scatterlayer").count() >= n_figures
            assert page.locator("h1").inner_text() == HOSTILE  # shown as text, not run
            assert page.title() == HOSTILE
            # the sortable table: click "loss" and the rows come out in ascending order
            table = page.locator("table.data", has=page.locator("th", has_text="n_represented")).first
            table.locator("th", has_text=re.compile(r"^loss$")).click()
            col = [h.strip() for h in table.locator("thead th").all_inner_texts()].index("loss")
            values = [float(r.locator("td").nth(col).inner_text()) for r in table.locator("tbody tr").all()]
            assert values == sorted(values) and len(values) == 3
        finally:
            browser.close()
    assert dialogs == [] and errors == []
    assert blocked == []
    assert requests and all(u.startswith("file://") for u in requests)


def test_asymmetric_motifs_are_listed():
    import torch

    from superposition.runs import train

    spec = parse_spec(
        {
            "name": "motif",
            "model": {"kind": "mlp", "n_features": 3, "d_hidden": 3},
            "data": {"magnitude": "signed"},
            "task": {"target": "abs"},
            "train": {"steps": 2, "batch_size": 16, "log_every": 1, "eval_batch": 64},
        }
    )
    result = train(spec)
    W1 = torch.zeros(1, 3, 3)
    W2 = torch.zeros(1, 3, 3)
    W1[0, 0, 0], W1[0, 0, 1], W2[0, 0, 0], W2[0, 1, 0] = 1.0, 0.3, 0.3, 1.0  # neuron 0: big in for 0, big out for 1
    W1[0, 2, 0], W2[0, 1, 2] = 1.0, -1.0  # neuron 2 fires with feature 0 and cancels output 1
    with torch.no_grad():
        result.model.W1.copy_(W1)
        result.model.W2.copy_(W2)
    page = render_run(result)
    assert ">Asymmetric superposition motifs</h2>" in page
    table = page.split(">Asymmetric superposition motifs</h2>")[1].split("</table>")[0]
    cells = re.findall(r"<td>([^<]*)</td>", table)
    assert cells == ["0", "0", "0", "1", "2"]  # instance, neuron, feature i, feature j, cancelling neuron


def test_best_of_seeds_section_of_a_run_with_a_seed_axis():
    """A run with seeds as an instance axis gets a "Best of seeds" table (one row per setting, the per-seed counts
    beside it, escaped like every table); a run without one does not."""
    from superposition.best import best_of_seeds
    from superposition.report import best_section
    from superposition.runs import train

    spec = parse_spec(
        {
            "name": "seeds",
            "model": {"kind": "relu-output", "n_features": 3, "d_hidden": 2},
            "train": {"steps": 30, "batch_size": 32, "log_every": 10, "eval_batch": 128},
            "instances": {"combine": "product", "axes": {"data.feature_probability": [1.0, 0.1], "seed": [3, 4, 5]}},
        }
    )
    result = train(spec)
    # a hostile string in a column of the instances table must come out escaped in the best-of-seeds table
    result = result.__class__(**{**vars(result), "instances": result.instances.assign(note=HOSTILE)})
    section = best_section(result)
    assert section is not None and section.heading == "Best of seeds"
    table = section.tables[0]
    expect = best_of_seeds(result.instances, ["data.feature_probability"], "n_represented")
    assert table["data.feature_probability"].tolist() == [1.0, 0.1]
    assert table["n_seeds"].tolist() == [3, 3] and table["n_ranked"].tolist() == [3, 3]
    assert table["seed"].tolist() == expect["seed"].tolist() and set(table["seed"]) <= {3, 4, 5}
    assert table["n_like_best"].tolist() == expect["n_like_best"].tolist()
    for p, row in zip([1.0, 0.1], table.itertuples(), strict=True):
        seeds = result.instances[result.instances["data.feature_probability"] == p]
        assert row.loss == seeds["loss"].min()
    page = render_run(result)
    assert ">Best of seeds</h2>" in page
    part = page.split(">Best of seeds</h2>")[1].split("</table>")[0]
    assert "<th>n_seeds</th>" in part and "<th>n_like_best</th>" in part and html.escape(HOSTILE) in part
    assert HOSTILE not in page
    # the per-instance panels show the best seed of each setting
    panels = next(f.figure for f in plots.figures_for_run(result) if f.name == "features-2d")
    titles = [a.text for a in panels.layout.annotations if "best of" in (a.text or "")]
    assert len(titles) == 2 and all(t.endswith("(best of 3)") for t in titles)
    assert [f"seed = {s}" in t for s, t in zip(table["seed"], titles, strict=True)] == [True, True]
    assert best_section(train(parse_spec({**spec.model_dump(mode="json"), "instances": {"seed": [0, 1]}}))) is None
