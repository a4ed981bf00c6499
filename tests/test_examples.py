"""The example notebooks run top to bottom (quick settings) and their outputs load no script from the network."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.ipynb"))
REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//", re.IGNORECASE)


def test_examples_are_stored_without_outputs():
    assert len(EXAMPLES) >= 5
    for path in EXAMPLES:
        book = nbformat.read(path, as_version=4)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear its outputs"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_offline(path, tmp_path, monkeypatch):
    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME

    book = nbformat.read(path, as_version=4)
    # The kernel is this interpreter (the project's venv), started in a scratch folder; the notebooks write their
    # runs under tempfile.mkdtemp(), which TMPDIR points into tmp_path.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    client = nbclient.NotebookClient(
        book, timeout=240, kernel_name=NATIVE_KERNEL_NAME, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    texts = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{path.name}: {out.get('ename')}: {out.get('evalue')}"
            texts.extend(str(v) for v in out.get("data", {}).values())
    shown = "".join(texts)
    assert "application/vnd.plotly.v1+json" in str(book.cells) or "<div" in shown
    assert REMOTE_SCRIPT.search(shown) is None, f"{path.name}: an output loads a script from the network"
