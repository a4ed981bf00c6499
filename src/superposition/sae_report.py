"""The report sections of SAE folders: one SAE folder's scores and figures, and every folder of a run with a
Pareto figure over all of them. It sits above ``sae`` (which it reads), ``plots`` (which draws) and ``report``
(whose sections it fills), so that none of those imports another upwards."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from superposition import plots
from superposition.report import Section
from superposition.sae import Sae, load_sae, summary_table, true_directions
from superposition.spec import SAE_SPARSITY_FIELD, SpecError

if TYPE_CHECKING:
    from superposition.record import Run

__all__ = ["sae_sections", "sae_figures", "run_sae_sections", "SAE_FIGURES"]

SAE_FIGURES: dict[str, str] = {
    "sae-directions": "Decoder rows over the true feature directions (2-D activations, with the run)",
    "sae-cosines": "Cosine of each decoder row with each true feature (with the run)",
    "sae-dead": "Dead latents over training",
    "sae-pareto": "Recovery vs L0 (several sparsity settings)",
}
"""Every figure name :func:`sae_figures` may return, with what it shows (report order)."""


def _short_labels(sae: Sae) -> list[str]:
    """A label per SAE of the folder naming only the settings that vary (else the architecture)."""
    field = SAE_SPARSITY_FIELD[sae.architecture]
    vary_s = len(sae.spec.sparsity_values(sae.architecture)) > 1
    vary_r = len(sae.spec.resample_methods) > 1
    out = []
    for g in sae.model.grid:
        parts = [f"{field}={g['sparsity']:g}"] if vary_s else []
        parts += [f"resample {g['resample_method']}"] if vary_r else []
        out.append(", ".join(parts) or sae.architecture)
    return out


def sae_sections(sae: Sae, run: Run | None = None) -> list[Section]:
    """The report sections of one SAE folder: scores, directions over the true features, cosines, dead latents."""

    s = sae.spec
    field = SAE_SPARSITY_FIELD[sae.architecture]
    summary = summary_table(sae.scores)
    intro = [
        f"{sae.model.n_sae} {sae.architecture} SAE(s) per toy-model instance, {sae.model.n_instances} instance(s), "
        f"d_sae = {s.d_sae} on {sae.model.d_in}-dimensional activations; {s.steps} steps of batch {s.batch_size}, "
        f"lr {s.lr:g}, {'tied' if s.tied else 'untied'} decoder"
        f"{', rows kept at unit norm' if sae.model.normalize else ''}; {field} swept over "
        f"{', '.join(f'{v:g}' for v in s.sparsity_values(sae.architecture))}; resampling "
        f"{', '.join(s.resample_methods)} every {s.resample_every} steps "
        f"(dead: no firing in {s.resample_window} steps).",
        "Scores on fresh samples: mmcs_features = mean over true features of the best cosine with a decoder row; "
        "mmcs_latents = mean over latents of the best cosine with a true feature; recovered_90/99 = features whose "
        "best cosine exceeds 0.9/0.99 (of n_true represented ones); dead = never fire; dense = fire on more than "
        f"{s.dense_threshold:g} of samples; fvu = fraction of variance unexplained; shrinkage = reconstructed / true "
        "norm. all_recovered_99 counts instances whose SAE recovered every feature above 0.99.",
    ]
    sections = [
        Section(
            f"SAE {sae.name}: {sae.architecture}",
            paragraphs=intro,
            tables=[summary],
            figures=[f.figure for f in sae_figures(sae, run)],
        ),
    ]
    return sections


def sae_figures(sae: Sae, run: Run | None = None) -> list[plots.NamedFigure]:
    """The figures of one SAE folder (see ``SAE_FIGURES``; those needing the true features only with ``run``)."""
    s = sae.spec
    figures: list[plots.NamedFigure] = []

    def add(name: str, fig: Any) -> None:
        figures.append(plots.NamedFigure(name, SAE_FIGURES[name], fig))

    labels = _short_labels(sae)
    dec = sae.model.decoder.detach().float().cpu()
    dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    inst, m, d_sae = sae.model.n_instances, sae.model.n_sae, sae.model.d_sae
    dead = np.zeros((inst, m, d_sae), dtype=bool)
    lat = sae.latents
    dead[lat["instance"].to_numpy(), lat["sae"].to_numpy(), lat["latent"].to_numpy()] = lat["dead"].to_numpy()
    truth = true_directions(run.model, run.spec) if run is not None else None
    shown = [int(j) for j in np.unique(np.round(np.linspace(0, m - 1, min(4, m))).astype(np.int64))]
    if truth is not None and sae.model.d_in == 2:
        n_show = min(8, inst)
        feats = np.stack([truth.directions[i].cpu().numpy() for _ in shown for i in range(n_show)])
        rows = np.stack([dec[i, j].numpy() for j in shown for i in range(n_show)])
        titles = [f"{labels[j]} · inst 0" if i == 0 else f"inst {i}" for j in shown for i in range(n_show)]
        add(
            "sae-directions",
            plots.sae_directions_2d(
                feats,
                rows,
                titles,
                cols=n_show,
                dead=np.stack([dead[i, j] for j in shown for i in range(n_show)]),
                feature_labels=truth.labels,
                title="Decoder rows (coloured; dotted = dead latent) over the true feature directions (grey), "
                f"first {n_show} instances",
            ),
        )
    if truth is not None:
        t_hat = truth.directions[0].cpu()
        cos = torch.einsum("msd,td->mst", dec[0], t_hat / t_hat.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()
        add(
            "sae-cosines",
            plots.sae_cosine_heatmap(
                cos[shown],
                truth.labels,
                [labels[j] for j in shown],
                title="Cosine of each decoder row with each true feature (instance 0)",
            ),
        )
    if len(sae.history):
        hist = sae.history.groupby(["step", "sae"], as_index=False)["dead"].mean()
        hist["series"] = [labels[j] for j in hist["sae"]]
        ev = sae.resamples[sae.resamples["resampled"] > 0].groupby(["step", "sae"], as_index=False)["resampled"].sum()
        ev["series"] = [labels[j] for j in ev["sae"]]
        add(
            "sae-dead",
            plots.sae_dead_latents(
                hist[["step", "series", "dead"]],
                ev[["step", "series", "resampled"]],
                title=f"Dead latents over training (mean over instances; no firing in {s.resample_window} steps)",
            ),
        )
    if len(s.sparsity_values(sae.architecture)) > 1:  # a curve needs several sparsity settings
        add("sae-pareto", _pareto(sae.scores))
    return figures


def _pareto(scores: pd.DataFrame) -> Any:

    summary = summary_table(scores)
    summary["curve"] = summary["architecture"]
    if summary["resample_method"].nunique() > 1:
        summary["curve"] = summary["curve"] + " · resample " + summary["resample_method"]
    summary["label"] = [f"{r.sparsity_field}={r.sparsity:g}" for r in summary.itertuples()]
    true_l0 = float(scores["true_l0"].mean()) if "true_l0" in scores else None
    return plots.sae_pareto(
        summary,
        x="l0",
        ys=["mmcs_features", "recovered_99", "fvu"],
        curve="curve",
        label="label",
        title="Recovery vs L0 (mean over instances; one point per sparsity setting; dotted: active true features)",
        reference_x=true_l0,
        reference_name=f"true L0 = {true_l0:.3g}" if true_l0 is not None else "true L0",
    )


def run_sae_sections(run: Run) -> list[Section]:
    """Sections for every SAE folder under RUN/sae/ (what the run's report shows), with a Pareto figure over all."""

    if run.path is None:
        return []
    root = Path(run.path) / "sae"
    if not root.is_dir():
        return []
    saes, sections = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            saes.append(load_sae(folder))
        except SpecError as exc:
            sections.append(Section(f"SAE {folder.name}", paragraphs=[f"could not be read: {exc}"]))
    if len(saes) > 1:
        table = pd.concat([s.scores for s in saes], ignore_index=True)
        sections.append(
            Section(
                "SAE architectures: recovery vs L0",
                paragraphs=[
                    "Every SAE folder of this run, mean over instances per setting. Up and to the left is better "
                    "for recovery; down and to the left for fvu."
                ],
                tables=[summary_table(table)],
                figures=[_pareto(table)],
            )
        )
    for sae in saes:
        sections.extend(sae_sections(sae, run))
    return sections
