"""The rules of the sparse-autoencoder presets: sae-recovery (dead latents and recovered features per resampling
method) and sae-architectures (each architecture's best setting), read from the run's SAE folders (RUN/sae/<name>/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from superposition.claims.common import Row, fmt
from superposition.errors import SpecError
from superposition.record import Run
from superposition.sae import Sae, load_sae, summary_table

__all__ = ["sae_architectures", "sae_recovery"]


_SAE_NAMES = {"relu": "ReLU", "gated": "Gated", "jumprelu": "JumpReLU", "topk": "TopK", "batchtopk": "BatchTopK"}


_SAE_FIELDS = {"l1_coefficient": "L1", "l0_coefficient": "L0", "k": "k", "batch_k": "k"}


def _sae_summaries(run: Run) -> list[tuple[Sae, pd.DataFrame]]:
    """Each SAE folder of the run's [sae] section (RUN/sae/<name>/) with its score table averaged over instances."""
    spec = run.spec.sae
    if spec is None or run.path is None:
        raise SpecError(f"{run.path}: the run has no [sae] section or no folder")
    out = []
    for arch in spec.architectures:
        sae = load_sae(Path(run.path) / "sae" / spec.folder_name(arch))
        out.append((sae, summary_table(sae.scores)))
    return out


def _sae_timing(run: Run, saes: list[tuple[Sae, pd.DataFrame]]) -> str:
    parts = [f"{s.name} {s.meta['train_seconds']:.0f} s" for s, _ in saes]
    return f"toy model {run.meta['train_seconds']:.0f} s; SAEs {', '.join(parts)}"


def _setting(row: Any) -> str:
    """``L1 0.2`` / ``k 1``: an SAE setting as the table names it."""
    return f"{_SAE_FIELDS.get(row.sparsity_field, row.sparsity_field)} {fmt(row.sparsity)}"


def sae_recovery(run: Run) -> Row:
    """Dead latents and recovered features per resampling method (score tables of RUN/sae/<name>/)."""
    saes = _sae_summaries(run)
    sae, table = saes[0]
    n = fmt(table["n_true"].mean())
    several = table["sparsity"].nunique() > 1
    parts = []
    for r in table.itertuples():
        label = "no resampling" if r.resample_method == "none" else f"{r.resample_method} resampling"
        label = f"{_setting(r)}, {label}" if several else label
        parts.append(
            f"{label} {fmt(r.dead)} dead latents, {fmt(r.recovered_99, 2)} of {n} features at cos > 0.99, "
            f"all {n} in {r.all_recovered_99}/{r.instances} instances, FVU {fmt(r.fvu, 2)}"
        )
    none = table[table["resample_method"] == "none"]
    resampled = table[table["resample_method"] != "none"]
    if none.empty or resampled.empty:
        verdict = "no (the [sae] section needs resample_method 'none' and at least one resampling method)"
    else:
        dead0 = float(none["dead"].max())
        rec0 = int(none["all_recovered_99"].max())
        dead, rec, inst = resampled["dead"], resampled["all_recovered_99"], resampled["instances"]
        die = dead0 > 0
        full = bool((dead == 0).all() and (rec == inst).all())
        most = bool((dead <= dead0 / 10).all() and (rec >= 0.75 * inst).all() and (rec > rec0).all())
        word = "yes" if die and full else "mostly" if die and most else "no"
        after = " and ".join(f"{a}/{b}" for a, b in zip(rec, inst, strict=True))
        verdict = (
            f"{word} (rule: yes = latents die without resampling, and every resampling method leaves none dead and "
            f"recovers all {n} at cos > 0.99 in every instance; mostly = at most a tenth of the dead latents left and "
            f"all {n} in ≥ 3/4 of the instances, more than without): dead {fmt(dead0)} → "
            f"{' / '.join(fmt(v) for v in dead)}, all {n} in {rec0}/{int(none['instances'].max())} → {after} "
            "instances; see the SAE note"
        )
    return Row(
        f"{run.spec.n_instances} instances, {_SAE_NAMES[sae.architecture]} SAEs d_sae {sae.spec.d_sae}"
        + ("" if several else f", {_setting(next(table.itertuples()))}")
        + f", mean per instance: {'; '.join(parts)}",
        "without resampling some latents die; with resampling all 5 features are recovered",
        verdict,
        _sae_timing(run, saes),
    )


def sae_architectures(run: Run) -> Row:
    """The best setting of each architecture, and what the near-perfect reconstructions recover."""
    saes = _sae_summaries(run)
    table = pd.concat([t for _, t in saes], ignore_index=True)
    data_l0 = run.spec.model.n_features * float(run.spec.data.feature_probability)
    n = fmt(table["n_true"].mean())
    best = (
        table.sort_values(["all_recovered_99", "mmcs_features"], ascending=False, kind="stable")
        .groupby("architecture", sort=False)
        .head(1)
    )
    parts = [
        f"{_SAE_NAMES[r.architecture]} {_setting(r)}: {r.all_recovered_99}/{r.instances}, {r.mmcs_features:.3f}, "
        f"{fmt(r.l0)}, {fmt(r.fvu, 2)}"
        for r in best.itertuples()
    ]
    exact = table[table["fvu"] < 1e-3]
    weak = "no setting reaches FVU < 0.001"
    if len(exact):
        k = int(exact["all_recovered_99"].max())
        weak = (
            f"settings with FVU < 0.001 ({len(exact)} of {len(table)}): at most {fmt(exact['recovered_99'].max(), 2)} "
            f"of {n} features at cos > 0.99, "
            + (f"all {n} in at most {k} instances" if k else f"no instance with all {n}")
        )
    near = (best["l0"] <= 3 * data_l0) & (best["l0"] >= data_l0 / 3)
    names = [_SAE_NAMES[a] for a in best["architecture"]]
    yes = [a for a, ok in zip(names, near, strict=True) if ok]
    no = [f"{a} (L0 {fmt(v)})" for a, v, ok in zip(names, best["l0"], near, strict=True) if not ok]
    methods = ", ".join(dict.fromkeys(table["resample_method"]))
    return Row(
        f"{run.spec.n_instances} instances, d_sae {saes[0][0].spec.d_sae}, resampling {methods}; best setting per "
        f"architecture (instances with all {n} features at cos > 0.99, mean max cosine, L0, FVU): {'; '.join(parts)}. "
        f"Weak penalties: {weak}",
        f"no source numbers (the issue asks for the comparison); data L0 = {fmt(data_l0)}",
        f"n/a; rule: the best setting's L0 within a factor 3 of the data's {fmt(data_l0)}: "
        f"{'yes for ' + ', '.join(yes) if yes else 'for none'}"
        + (f"; not for {', '.join(no)}" if no else "")
        + " (Pareto figure in the report)",
        _sae_timing(run, saes),
    )
