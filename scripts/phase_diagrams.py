"""Reproduce the numbers of docs/phase-changes.md: train the two phase-diagram presets and compute the analytic
diagrams (paper / bias / free conventions) on the preset grids and on finer grids.

    python scripts/phase_diagrams.py --out runs/phase            # train (device from --device) + analytic
    python scripts/phase_diagrams.py --out runs/phase --analyse  # compare saved runs with the analytic diagrams

Stages write into --out: one run folder per preset, ``analytic.npz`` (every diagram), ``log.txt``. With
``--device cuda`` the training runs on the GPU and the analytic stage uses it as torch's default device.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from superposition import phase
from superposition import theory as T
from superposition.runs import load_run, run
from superposition.spec import load_spec

PRESETS = {"phase-diagram": (2, 1), "phase-diagram-3x2": (3, 2)}


def log(out: Path, text: str) -> None:
    with open(out / "log.txt", "a", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text, flush=True)


def grids(n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (importances (R, n), densities (P,)); the last feature's relative importance varies."""

    def rows(r: np.ndarray) -> np.ndarray:
        return np.concatenate([np.ones((len(r), n - 1)), r[:, None]], axis=1)

    out = {"fine": (rows(np.logspace(-1, 1, 41)), np.logspace(-2, 0, 41))}
    if n == 3:
        out["zoom"] = (rows(np.logspace(np.log10(0.5), np.log10(2.0), 41)), np.logspace(np.log10(0.2), 0, 41))
    return out


def train_stage(out: Path, device: str, quick: bool) -> None:
    for name in PRESETS:
        folder = out / name
        if folder.exists():
            continue
        spec = load_spec(name, overrides=[f"device={device}"], quick=quick)
        start = time.perf_counter()
        result = run(spec, folder)
        log(
            out,
            f"trained {name}: {spec.n_instances} instances, {spec.train.steps} steps, "
            f"{time.perf_counter() - start:.1f} s total, train {result.meta['train_seconds']} s on {device}",
        )


def zoom_spec(device: str, quick: bool):
    """The 3×2 preset trained on the zoom grid around the triangle's island (r 0.5..2, density 0.2..1)."""
    imp, ps = grids(3)["zoom"]
    step = 9 if quick else 3
    overrides = [
        f"device={device}",
        "name=phase-diagram-3x2-zoom",
        f"instances.task.importance={[[float(f'{v:.5g}') for v in row] for row in imp[::step]]}",
        f"instances.data.feature_probability={[float(f'{v:.5g}') for v in ps[::step]]}",
    ]
    return load_spec("phase-diagram-3x2", overrides=overrides, quick=quick)


def zoom_stage(out: Path, device: str, quick: bool) -> None:
    folder = out / "phase-diagram-3x2-zoom"
    if folder.exists():
        return
    spec = zoom_spec(device, quick)
    start = time.perf_counter()
    result = run(spec, folder)
    log(
        out,
        f"trained zoom: {spec.n_instances} instances, {spec.train.steps} steps, "
        f"{time.perf_counter() - start:.1f} s total, train {result.meta['train_seconds']} s on {device}",
    )


def analytic_stage(out: Path, device: str, quick: bool, conventions=T.CONVENTIONS, steps: int = 200) -> None:
    if device == "cuda":
        torch.set_default_device("cuda")
    target = out / ("analytic.npz" if tuple(conventions) == T.CONVENTIONS else f"analytic_{'_'.join(conventions)}.npz")
    data: dict[str, np.ndarray] = {}
    for name, (n, m) in [*PRESETS.items(), ("phase-diagram-3x2-zoom", (3, 2))]:
        spec = zoom_spec("cpu", quick) if name.endswith("zoom") else load_spec(name, quick=quick)
        g = phase.phase_grid(spec)
        todo = {"preset": (g.importances, g.probabilities)}
        if not (quick or name.endswith("zoom")):
            todo |= grids(n)
        for grid_name, (imp, ps) in todo.items():
            for conv in conventions:
                start = time.perf_counter()
                try:
                    d = T.analytic_phase_diagram(n, m, imp, ps, conv, free_steps=steps)
                except Exception:  # e.g. a GPU problem: fall back to the CPU for the rest
                    log(out, f"analytic {name}/{grid_name}/{conv} failed on {device}:\n{traceback.format_exc()}")
                    torch.set_default_device("cpu")
                    device = "cpu"
                    d = T.analytic_phase_diagram(n, m, imp, ps, conv, free_steps=steps)
                key = f"{name}/{grid_name}/{conv}"
                data[key + "/losses"] = d.losses
                data[key + "/biases"] = d.biases
                data[key + "/norms"] = d.norms
                if d.weights is not None:
                    data[key + "/weights"] = d.weights
                data[f"{name}/{grid_name}/importances"] = d.importances
                data[f"{name}/{grid_name}/probabilities"] = d.probabilities
                data[f"{name}/names"] = np.array([c.name for c in d.candidates])
                log(out, f"analytic {key}: {len(ps)}x{len(imp)} cells, {time.perf_counter() - start:.1f} s")
                np.savez_compressed(target, **data)


def counts(values: np.ndarray) -> dict[str, int]:
    keys, n = np.unique(values, return_counts=True)
    return {str(k): int(v) for k, v in zip(keys, n, strict=True)}


def analyse(out: Path) -> dict:
    """Agreement of every saved run with the analytic diagrams on its grid, and what the triangle does."""
    saved = stored(out)
    report: dict = {}
    for name, (n, m) in [*PRESETS.items(), ("phase-diagram-3x2-zoom", (3, 2))]:
        folder = out / name
        if not folder.exists():
            continue
        emp = phase.empirical_diagram(load_run(folder))
        g = emp.grid
        cls_names = np.array([c.name for c in emp.candidates])
        entry: dict = {"cells": int(emp.winner.size), "instances": int(len(emp.instance_class))}
        entry["winners"] = counts(cls_names[emp.winner])
        entry["instances_by_class"] = counts(cls_names[emp.instance_class])
        for conv in T.CONVENTIONS:
            if f"{name}/preset/{conv}/losses" in saved:  # stored (possibly GPU-computed)
                ana = load_diagram(saved, name, "preset", conv, n, m, g.importances, g.probabilities)
            elif conv in ("paper", "bias"):
                ana = T.analytic_phase_diagram(n, m, g.importances, g.probabilities, conv)
            else:
                continue
            agree = phase.agreement(emp, ana)
            best = ana.losses.min(-1) / n
            row = {"agreement": round(float(agree.mean()), 4)}
            row["trained_over_analytic_best"] = [
                round(float(q), 4) for q in np.quantile(emp.exact_loss / best, [0, 0.5, 1])
            ]
            if n == 3:
                tri_a = [c.name for c in ana.candidates].index("triangle(1,2,3)")
                tri_e = list(cls_names).index("triangle(1,2,3)")
                wins = ana.winner == tri_a
                share = np.zeros(wins.shape)
                np.add.at(share, (g.row, g.col), emp.instance_class == tri_e)
                share /= np.bincount(g.row * len(g.probabilities) + g.col, minlength=wins.size).reshape(wins.shape)
                row["triangle_cells"] = int(wins.sum())
                row["triangle_cells_best_seed_triangle"] = int((emp.winner[wins] == tri_e).sum())
                row["triangle_cells_seed_share"] = round(float(share[wins].mean()), 3) if wins.any() else None
            entry[conv] = row
        report[name] = entry
    return report


def stored(out: Path) -> dict[str, np.ndarray]:
    """Every analytic array saved under ``out`` (analytic*.npz), by key."""
    data: dict[str, np.ndarray] = {}
    for f in sorted(out.glob("analytic*.npz")):
        data.update(dict(np.load(f)))
    return data


def load_diagram(data: dict[str, np.ndarray], name: str, grid: str, conv: str, n: int, m: int, imp, ps):
    """A theory.PhaseDiagram rebuilt from stored arrays (candidates: the maximal ones of n features in m dims)."""
    losses = data[f"{name}/{grid}/{conv}/losses"]
    order = np.sort(losses, axis=-1)
    return T.PhaseDiagram(
        candidates=T.candidates(n, m, maximal=True),
        importances=np.asarray(imp),
        probabilities=np.asarray(ps),
        losses=losses,
        winner=losses.argmin(-1),
        gap=order[..., 1] - order[..., 0],
        biases=data[f"{name}/{grid}/{conv}/biases"],
        norms=data[f"{name}/{grid}/{conv}/norms"],
        convention=conv,
        weights=data.get(f"{name}/{grid}/{conv}/weights"),
    )


def figures(out: Path, dest: Path) -> None:
    """The figures of docs/phase-changes.md as PNG (offline, kaleido + local Chromium) into ``dest``."""
    from superposition import plots
    from superposition.report import figure_image

    data = stored(out)
    dest.mkdir(parents=True, exist_ok=True)
    todo = []
    for name, (n, m), conv in [
        ("phase-diagram", (2, 1), "free"),
        ("phase-diagram-3x2", (3, 2), "free"),
        ("phase-diagram-3x2-zoom", (3, 2), "open"),
    ]:
        emp = phase.empirical_diagram(load_run(out / name))
        g = emp.grid
        conv = conv if f"{name}/preset/{conv}/losses" in data else "free"
        ana = load_diagram(data, name, "preset", conv, n, m, g.importances, g.probabilities)
        lines = []
        if n == 2:
            rr = np.geomspace(0.1, 10, 101)
            lines.append(("closed form s* (paper conventions)", rr, T.two_by_one_boundary(rr)))
        todo.append((f"{name}.png", plots.phase_comparison(ana, emp, boundaries=lines)))
    for name, (n, m) in PRESETS.items():
        imp = data[f"{name}/fine/importances"]
        ps = data[f"{name}/fine/probabilities"]
        ana = load_diagram(data, name, "fine", "paper" if n == 2 else "free", n, m, imp, ps)
        todo.append((f"{name}-gap.png", plots.phase_gap(ana)))
    for file, fig in todo:
        (dest / file).write_bytes(figure_image(fig, "png", scale=1.0))
        log(out, f"figure {dest / file}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-analytic", action="store_true")
    ap.add_argument("--analyse", action="store_true")
    ap.add_argument("--figures", type=Path, default=None, help="write the docs figures (PNG) into this folder")
    ap.add_argument("--conventions", default=",".join(T.CONVENTIONS), help="analytic conventions to compute")
    ap.add_argument("--steps", type=int, default=200, help="Adam steps of the free and open conventions")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.analyse:
        print(json.dumps(analyse(args.out), indent=2))
        return
    if args.figures is not None:
        figures(args.out, args.figures)
        return
    stages = [
        ("train", train_stage, args.skip_train),
        ("zoom", zoom_stage, args.skip_train),
        ("analytic", analytic_stage, args.skip_analytic),
    ]
    conventions = tuple(args.conventions.split(","))
    for label, stage, skip in stages:
        if skip:
            continue
        try:
            if stage is analytic_stage:
                stage(args.out, args.device, args.quick, conventions, args.steps)
            else:
                stage(args.out, args.device, args.quick)
        except Exception:  # keep going: each stage's results are useful alone
            log(args.out, f"stage {label} failed:\n{traceback.format_exc()}")


if __name__ == "__main__":
    main()
