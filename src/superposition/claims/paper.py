"""The rules of the presets that reproduce the paper (Toy Models of Superposition) and its curriculum: the first
figure, the pentagon, correlated and anticorrelated pairs, the feature geometry and double descent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from superposition import best, metrics
from superposition.claims.common import Row, SweepResult, group_runs, probs, seq
from superposition.record import Run

__all__ = ["anticorrelated", "correlated", "double_descent", "geometry", "pentagon", "relu_vs_linear"]


def relu_vs_linear(run: Run) -> Row:
    df = run.instances.assign(p=probs(run.spec)).sort_values("p", ascending=False)
    lin = df[df["model.kind"] == "linear"]["n_represented"].tolist()
    relu = df[df["model.kind"] == "relu-output"]["n_represented"].tolist()
    ps = df[df["model.kind"] == "linear"]["p"].tolist()
    ok_lin = all(v == run.spec.model.d_hidden for v in lin)
    paper = [5, 7, 9, 10, 11, 12, 12]
    close = sum(abs(a - b) <= 1 for a, b in zip(relu, paper, strict=False))
    verdict = "yes" if ok_lin and close >= 6 else ("partly" if ok_lin else "no")
    return Row(
        f"features with ‖W_i‖ > 0.5 at p = {seq(ps)}: ReLU {seq(relu)}; linear {seq(lin)}",
        "ReLU ≈ 5, 7, 9, 10, 11, 12, 12; linear 5 at every p",
        f"{verdict} (linear = d everywhere; ReLU within ±1 of the paper at {close}/7 probabilities)",
    )


def _angles(W: torch.Tensor) -> np.ndarray:
    """Gaps (degrees) between the sorted directions of the represented 2-D feature vectors of one instance."""
    norms = W.norm(dim=0)
    keep = W[:, norms > 0.5]
    theta = np.sort(np.degrees(np.arctan2(keep[1].numpy(), keep[0].numpy())) % 360)
    if len(theta) < 2:
        return np.array([])
    return np.diff(np.concatenate([theta, theta[:1] + 360]))


def _is_pentagon(W: torch.Tensor) -> bool:
    """Whether one instance's 2-D feature vectors form a regular pentagon: 5 represented, 72° ± 10°, norms > 0.8."""
    gaps = _angles(W)
    return len(gaps) == 5 and bool(np.all(np.abs(gaps - 72) < 10)) and float(W.norm(dim=0).min()) > 0.8


def _per_seed(best: pd.DataFrame, of: str = "n_true") -> str:
    """``k/n``: the ranked seeds counted in column ``of`` over every seed of the best-of-seeds table."""
    return f"{int(best[of].sum())}/{int(best['n_seeds'].sum())}"


def _seeds_note(best: pd.DataFrame) -> str:
    n = sorted(set(best["n_seeds"]))
    return f"best of {n[0] if len(n) == 1 else seq(n)} seed{'s' if n != [1] else ''}"


def pentagon(run: Run) -> Row:
    """Per probability the best seed (:func:`superposition.best.best_of_seeds`): features represented at the dense
    end, a regular pentagon at the sparsest p; the per-seed rate of pentagons at the sparsest p beside it."""
    W = run.model.encoder.detach().float()
    df = run.instances.assign(p=probs(run.spec), pentagon=[_is_pentagon(W[i]) for i in range(len(run.instances))])
    table = best.best_of_seeds(df, best.setting_columns(run.spec), "pentagon")
    last = int(table["p"].idxmin())
    i = int(table["instance"][last])
    gaps = _angles(W[i])
    norms = W[i].norm(dim=0).numpy()
    counts = table["n_represented"].tolist()
    is_pentagon = bool(table["pentagon"][last])
    sparsest = table.iloc[[last]]
    return Row(
        f"{_seeds_note(table)} per probability; represented at p = {seq(table['p'])}: {seq(counts)}; at "
        f"p = {table['p'][last]:.3g}: norms {seq(norms, 2)}, gaps between neighbours {seq(gaps.round(1))}°; "
        f"pentagon in the best seed at the sparsest p: {'yes' if is_pentagon else 'no'}; per seed "
        f"{_per_seed(sparsest)}",
        "2 features at dense p, antipodal pairs, then all 5 on a pentagon at high sparsity",
        f"{'yes' if is_pentagon and counts[0] == 2 else 'no'} (best seed per p; dense: 2 represented; sparsest: 5 at "
        "72° ± 10°, norms > 0.8)",
    )


def correlated(run: Run) -> Row:
    """Per probability the best seed: its within-pair cosines (|cos| < 0.3 for every pair with both features
    represented); the per-seed rate of instances whose represented pairs are all orthogonal beside it."""
    W = run.model.encoder.detach().float()
    cos = metrics.pair_cosines(W, *run.spec.n_pairs).correlated.numpy()
    norms = metrics.feature_norms(W).numpy()
    both = (norms[:, 0 : 2 * cos.shape[1] : 2] > 0.5) & (norms[:, 1 : 2 * cos.shape[1] : 2] > 0.5)
    orth = both & (np.abs(cos) < 0.3)
    n_both, n_orth = both.sum(axis=1), orth.sum(axis=1)
    df = run.instances.assign(
        p=probs(run.spec), pairs_both=n_both, pairs_orth=n_orth, orthogonal=(n_both > 0) & (n_orth == n_both)
    )
    table = best.best_of_seeds(df, best.setting_columns(run.spec), "orthogonal")
    rows = table["instance"].to_numpy()
    pairs, ok_pairs = int(table["pairs_both"].sum()), int(table["pairs_orth"].sum())
    ok = pairs > 0 and ok_pairs == pairs
    return Row(
        f"{_seeds_note(table)} per probability; within-pair cosines at p = {seq(table['p'])}: "
        f"{'; '.join(seq(cos[i], 2) for i in rows)}; represented {seq(table['n_represented'])}; every represented "
        f"pair orthogonal in the best seed at {int(table['orthogonal'].sum())}/{len(table)} probabilities; per seed "
        f"{_per_seed(table)}",
        "correlated pairs form local orthogonal bases (cosine ≈ 0)",
        f"{'yes' if ok else 'no'} (best seed per p: |cos| < 0.3 for every pair with both features represented: "
        f"{ok_pairs}/{pairs})",
    )


def anticorrelated(run: Run) -> Row:
    """Per probability the lowest-loss seed (:func:`superposition.best.best_of_seeds`): its mean within-pair
    cosine, and beside it how many seeds went antipodal."""
    df = run.instances.assign(p=probs(run.spec), antipodal=run.instances["cos_anti"] < -0.9)
    table = best.best_of_seeds(df, best.setting_columns(run.spec), "antipodal")
    cos = table["cos_anti"].astype(float).tolist()
    n_seeds = int(table["n_seeds"].max())
    hits = int(table["antipodal"].sum())
    verdict = "yes" if hits == len(table) else ("partly" if hits else "no")
    return Row(
        f"mean within-pair cosine of the lowest-loss seed (of {n_seeds}) at p = {seq(table['p'])}: {seq(cos, 3)}; "
        f"seeds with both pairs antipodal (cosine < −0.9) per p: {seq(table['n_true'])} of {n_seeds}; antipodal in "
        f"the best seed at {hits}/{len(table)} probabilities; per seed {_per_seed(table)}",
        "anticorrelated pairs go antipodal (cosine ≈ −1) at dense p",
        f"{verdict} (the lowest-loss seed has cosine < −0.9 at {hits} of {len(table)} probabilities; yes = all)",
    )


def geometry(run: Run) -> Row:
    df = run.instances.assign(p=probs(run.spec))
    W = run.model.encoder.detach().float()
    geo = metrics.recognise_geometry(W)
    rep = ~torch.isnan(geo.sticky)
    near = (geo.distance < 0.05) & rep
    dpf = df["dims_per_feature"].to_numpy()
    # The sticky catalogue ends at the square antiprism (D = 3/8): where the average dimension per feature is
    # below that, the features cannot all sit in those polytopes, so the share is read where dpf >= 3/8.
    structured = torch.as_tensor(dpf >= 3 / 8)
    share = float(near[structured].sum()) / max(int(rep[structured].sum()), 1)
    counts = {name: int(((geo.polytope == k) & near)[structured].sum()) for k, name in enumerate(metrics.POLYTOPES)}
    plateau = int(((dpf > 0.45) & (dpf < 0.55)).sum())
    ok = dpf[0] > 0.9 and share > 0.5 and plateau >= 1
    return Row(
        f"dims per feature at 1/(1−S) = {seq(1 / df['p'], 3)}: {seq(dpf, 2)}; where dims per feature ≥ 3/8 "
        f"({int(structured.sum())} probabilities), {share:.0%} of represented features lie within 0.05 of a sticky "
        f"D_i ({', '.join(f'{k} {v}' for k, v in counts.items() if v)}); below that, D_i falls under 3/8",
        "dims per feature falls from 1 in plateaus (1/2 prominent); D_i at 1, 3/4, 2/3, 1/2, 2/5, 3/8",
        f"{'yes' if ok else 'no'} (1 at p = 1, a probability at 1/2 ± 0.05, > 50% of features at a sticky value "
        "where dims per feature ≥ 3/8)",
    )


def double_descent(result: SweepResult) -> Row:
    rows = []
    for _, run in group_runs(result):
        rows.append(
            (
                int(run.spec.data.dataset_size or 0),
                float(run.instances["loss"].min()),
                float(run.instances["loss"].mean()),
                float(run.instances["train_loss"].mean()),
            )
        )
    rows.sort()
    T = [r[0] for r in rows]
    test = np.array([r[2] for r in rows])
    train = np.array([r[3] for r in rows])
    k = int(np.argmax(test))
    peak_inside = 0 < k < len(T) - 1 and test[k] > 1.2 * test[0] and test[k] > 1.2 * test[-1]
    return Row(
        f"test loss (mean over seeds) at T = {seq(T)}: {seq(test, 3)}; peak at T = {T[k]}; train loss {seq(train, 2)}",
        "test loss peaks between the memorising (small T) and generalising (large T) regimes",
        f"{'yes' if peak_inside else 'no'} (interior maximum, > 1.2 × both ends)",
    )
