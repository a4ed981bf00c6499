"""Analysis of trained weights, per instance: pure functions of the weights (no training, no I/O).

Every function takes tensors with the instance dimension first and returns one value per instance (or per
instance and feature / neuron). ``W`` is the encoder, shape (inst, hidden, feats): column ``W[:, :, i]`` is the
direction ``W_i`` in which feature ``i`` is embedded. The read-out matrix ``M`` (inst, feats, feats) maps inputs
to pre-bias outputs of the bottleneck models: ``M = WᵀW`` (tied) or ``M = W2·W1`` (untied).

Columns that :func:`instance_metrics` adds to every run's ``instances.parquet`` (one value per instance; a column
is present only where it makes sense for the model kind):

| column | meaning |
| --- | --- |
| ``n_represented`` | features with ‖W_i‖ > 0.5 (encoder columns) |
| ``n_learned_diag`` | features with diag(M)_i > 0.5, M = WᵀW or W2·W1 (seed 001's count of "learned" features) |
| ``dims_per_feature`` | d_hidden / ‖W‖_F² (1/‖W‖_F² per hidden dimension; < 1 means superposition) |
| ``superposition`` | mean over represented features of Σ_{j≠i} (Ŵ_i·W_j)² (0 when none is represented) |
| ``eff_rank`` | effective rank of W: exp of the entropy of its normalised singular values |
| ``benefit`` | feature benefit Σ_i I_i (1 − M_ii)² (bottleneck models) |
| ``interference`` | interference Σ_i I_i Σ_{j≠i} M_ij² (= Σ_{i≠j} I_j (W_j·W_i)² when tied) |
| ``naive_loss`` | loss of "keep the d most valuable features perfectly, drop the rest at their best constant", in the
  units of the ``loss`` column (mean over features); NaN where the naive baseline is not defined |
| ``monosemanticity`` | mean over live neurons of max_i |W_{n,i}| / ‖W_n‖ (neuron, mlp, residual-mlp) |
| ``cos_corr`` / ``cos_anti`` | mean cosine between the two features of each correlated / anticorrelated pair |
| ``ternary_pos`` / ``ternary_neg`` / ``ternary_zero`` | untied weights: fractions strongly +, strongly −, near 0 |
| ``n_motifs`` | untied neuron/mlp models: asymmetric superposition motifs found (:func:`asymmetric_motifs`) |
| ``n_computed`` | signed data, neuron/mlp/residual-mlp: features whose output is within 0.25 of the label at
  x_i = -1, 0, 1 with every other feature off (:func:`computation`) |
| ``n_abs_pairs`` | untied models with the abs target: features read by an antipodal pair of neurons that both write
  positively to them (:func:`abs_pairs`) |
| ``transplant_loss`` | one-layer residual-mlp with a random embedding: the loss of the same weights moved into a plain
  MLP (``models.transplant``) on the same evaluation samples as ``loss`` (equal to it without a skip connection) |

Thresholds are arguments with the defaults named above; every function states its own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from superposition.models import ToyModel
from superposition.spec import Experiment

__all__ = [
    "STICKY_VALUES",
    "POLYTOPES",
    "feature_norms",
    "n_represented",
    "readout_matrix",
    "learned_diag",
    "n_learned_diag",
    "superposition",
    "dims_per_feature",
    "feature_dimensionality",
    "Geometry",
    "recognise_geometry",
    "LossSplit",
    "loss_split",
    "neuron_monosemanticity",
    "NeuronComposition",
    "neuron_composition",
    "Motif",
    "asymmetric_motifs",
    "Ternary",
    "ternary_fractions",
    "PairCosines",
    "pair_cosines",
    "effective_rank",
    "Computation",
    "computation",
    "abs_pairs",
    "transplant_loss",
    "instance_metrics",
]

# The feature dimensionalities D_i at which represented features stick (the paper's geometry section), and the
# configuration each value belongs to: k features sharing m dimensions as a regular polytope have D = m / k.
STICKY_VALUES: tuple[float, ...] = (1.0, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 3 / 8)
POLYTOPES: tuple[str, ...] = ("dedicated", "tetrahedron", "triangle", "digon", "pentagon", "square antiprism")

_EPS = 1e-12


def feature_norms(W: Float[Tensor, "inst hidden feats"]) -> Float[Tensor, "inst feats"]:
    """‖W_i‖: the length of each feature's embedding direction (1 = represented, 0 = not)."""
    return W.norm(dim=-2)


def n_represented(W: Float[Tensor, "inst hidden feats"], threshold: float = 0.5) -> Int[Tensor, " inst"]:
    """Number of features with ‖W_i‖ > threshold, per instance."""
    return (feature_norms(W) > threshold).sum(dim=-1)


def readout_matrix(
    W: Float[Tensor, "inst hidden feats"], W2: Float[Tensor, "inst feats hidden"] | None = None
) -> Float[Tensor, "inst feats feats"]:
    """M with x' = M x + b before the output nonlinearity: WᵀW (tied, ``W2`` None) or W2·W1 (untied, W = W1)."""
    if W2 is None:
        return W.transpose(-1, -2) @ W
    return W2 @ W


def learned_diag(
    W: Float[Tensor, "inst hidden feats"], W2: Float[Tensor, "inst feats hidden"] | None = None
) -> Float[Tensor, "inst feats"]:
    """diag(M): ‖W_i‖² when tied, Σ_h W2[i,h]·W1[h,i] when untied (the diagonal seed 001 reads off its heatmaps)."""
    return torch.diagonal(readout_matrix(W, W2), dim1=-2, dim2=-1)


def n_learned_diag(
    W: Float[Tensor, "inst hidden feats"],
    W2: Float[Tensor, "inst feats hidden"] | None = None,
    threshold: float = 0.5,
) -> Int[Tensor, " inst"]:
    """Seed 001's count of learned features: diag(M)_i > ``threshold`` (0.5, halfway between dropped 0 and kept 1).

    For tied weights this is ‖W_i‖² > 0.5, i.e. ‖W_i‖ > 0.707: stricter than :func:`n_represented`'s ‖W_i‖ > 0.5.
    """
    return (learned_diag(W, W2) > threshold).sum(dim=-1)


def _unit_columns(W: Float[Tensor, "inst hidden feats"]) -> Float[Tensor, "inst hidden feats"]:
    return W / feature_norms(W).clamp_min(_EPS).unsqueeze(-2)


def superposition(W: Float[Tensor, "inst hidden feats"]) -> Float[Tensor, "inst feats"]:
    """Σ_{j≠i} (Ŵ_i·W_j)²: how much of the other features lies along feature i's direction (0 for a zero W_i)."""
    overlap = _unit_columns(W).transpose(-1, -2) @ W  # [i, j] = Ŵ_i · W_j
    sq = overlap.square()
    return sq.sum(dim=-1) - torch.diagonal(sq, dim1=-2, dim2=-1)


def dims_per_feature(W: Float[Tensor, "inst hidden feats"]) -> Float[Tensor, " inst"]:
    """d_hidden / ‖W‖_F²: hidden dimensions per (norm-weighted) represented feature."""
    return W.shape[-2] / W.square().sum(dim=(-2, -1)).clamp_min(_EPS)


def feature_dimensionality(W: Float[Tensor, "inst hidden feats"]) -> Float[Tensor, "inst feats"]:
    """D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)² (j includes i): 1 for a dedicated dimension, 1/2 antipodal, 0 if ‖W_i‖ = 0."""
    sq = feature_norms(W).square()
    return sq / (sq + superposition(W)).clamp_min(_EPS)


class Geometry(NamedTuple):
    """Each feature's dimensionality and the nearest sticky value (index into STICKY_VALUES / POLYTOPES)."""

    dimensionality: Float[Tensor, "inst feats"]
    """D_i per feature."""
    sticky: Float[Tensor, "inst feats"]
    """The nearest sticky value, NaN for features that are not represented."""
    polytope: Int[Tensor, "inst feats"]
    """Index into POLYTOPES of the nearest sticky value, -1 for features that are not represented."""
    distance: Float[Tensor, "inst feats"]
    """|D_i − sticky value| (NaN when not represented): large values mean no clean polytope."""

    def names(self) -> list[list[str]]:
        """Polytope names per instance and feature ('' for features that are not represented)."""
        return [[POLYTOPES[k] if k >= 0 else "" for k in row] for row in self.polytope.tolist()]


def recognise_geometry(W: Float[Tensor, "inst hidden feats"], threshold: float = 0.5) -> Geometry:
    """Label each represented feature (‖W_i‖ > ``threshold``) with the sticky value nearest to its D_i."""
    D = feature_dimensionality(W)
    values = torch.tensor(STICKY_VALUES, dtype=D.dtype, device=D.device)
    dist = (D.unsqueeze(-1) - values).abs()
    best = dist.argmin(dim=-1)
    rep = feature_norms(W) > threshold
    nan = torch.full_like(D, float("nan"))
    return Geometry(
        dimensionality=D,
        sticky=torch.where(rep, values[best], nan),
        polytope=torch.where(rep, best, torch.full_like(best, -1)),
        distance=torch.where(rep, dist.gather(-1, best.unsqueeze(-1)).squeeze(-1), nan),
    )


class LossSplit(NamedTuple):
    """The two terms of the linear model's loss (seed 003)."""

    benefit: Float[Tensor, " inst"]
    """Σ_i I_i (1 − M_ii)²: zero when every feature is kept at unit norm."""
    interference: Float[Tensor, " inst"]
    """Σ_i I_i Σ_{j≠i} M_ij²: zero when the kept features are orthogonal."""


def loss_split(M: Float[Tensor, "inst feats feats"], importance: Float[Tensor, "inst feats"]) -> LossSplit:
    """Feature benefit and interference of a read-out matrix M (see :func:`readout_matrix`).

    For tied weights M_ij = W_i·W_j, so the interference equals the paper's Σ_{i≠j} I_j (W_j·W_i)².
    Exact identity (tested; implemented by ``theory.linear_expected_loss``): for the linear model x' = M x + b on
    independent features that share E[x_i] = μ and E[x_i²] = ν, with σ² = ν − μ²,

        Σ_i I_i E[(x_i − x'_i)²] = σ² · (benefit + interference) + Σ_i I_i (μ Σ_j (δ_ij − M_ij) − b_i)²,

    so with zero-mean data and b = 0 the loss is exactly ν · (benefit + interference); for U[0,1] magnitudes at
    density p, σ² = p/3 − p²/4 and μ = p/2. The training loss of a run is this sum divided by n_features.
    """
    diag = torch.diagonal(M, dim1=-2, dim2=-1)
    benefit = (importance * (1 - diag).square()).sum(dim=-1)
    off = (importance * (M.square().sum(dim=-1) - diag.square())).sum(dim=-1)
    return LossSplit(benefit, off)


def neuron_monosemanticity(W: Float[Tensor, "inst hidden feats"]) -> Float[Tensor, "inst hidden"]:
    """max_i |W_{n,i}| / ‖W_n‖ per neuron n (row of W): 1 = reads one feature, 1/√n = reads all equally.

    NaN for dead neurons (‖W_n‖ = 0).
    """
    norm = W.norm(dim=-1)
    mono = W.abs().amax(dim=-1) / norm.clamp_min(_EPS)
    return torch.where(norm > 0, mono, torch.full_like(mono, float("nan")))


class NeuronComposition(NamedTuple):
    """What each neuron reads: the signed weights and each feature's share of the neuron's squared norm."""

    weights: Float[Tensor, "inst hidden feats"]
    """W_{n,i}: the stacked-bar heights of seed 000's neuron plots."""
    share: Float[Tensor, "inst hidden feats"]
    """W_{n,i}² / ‖W_n‖² (sums to 1 over features for a live neuron, 0 for a dead one)."""


def neuron_composition(W: Float[Tensor, "inst hidden feats"]) -> NeuronComposition:
    """Per-neuron feature composition for stacked bars (one bar per neuron, one segment per feature)."""
    sq = W.square()
    return NeuronComposition(W, sq / sq.sum(dim=-1, keepdim=True).clamp_min(_EPS))


class Motif(NamedTuple):
    """One asymmetric superposition motif (seed 000)."""

    instance: int
    neuron: int
    features: tuple[int, int]
    """(i, j): i has the large input weight W1[n, i], j the large output weight W2[j, n]."""
    cancelling_neuron: int | None
    """A neuron m that fires with feature i and writes negatively to output j, or None if none does."""


def asymmetric_motifs(
    W1: Float[Tensor, "inst hidden feats"],
    W2: Float[Tensor, "inst feats hidden"],
    ratio: float = 2.0,
    path: float = 0.1,
    cancel: float = 0.5,
) -> list[Motif]:
    """Find neurons that carry two features with swapped input/output magnitudes (asymmetric superposition).

    Neuron n carries feature i and j when both read-out paths are positive and not small:
    ``|W1[n,i]|·W2[i,n] ≥ path`` and ``|W1[n,j]|·W2[j,n] ≥ path`` (W2 > 0: the |x| and identity targets are ≥ 0).
    The magnitudes are swapped when ``|W1[n,i]| ≥ ratio·|W1[n,j]|`` and ``W2[j,n] ≥ ratio·W2[i,n]``. Then feature i
    alone leaks ``W2[j,n]·|W1[n,i]|`` (large × large) into output j. The cancelling neuron is the m ≠ n that fires
    for the same sign of x_i (sign W1[m,i] = sign W1[n,i]) and writes most negatively into output j, kept when it
    removes at least ``cancel`` of the leak: ``W2[j,m]·|W1[m,i]| ≤ −cancel · leak``.
    """
    a = W1  # [inst, n, i]
    c = W2.transpose(-1, -2)  # [inst, n, i] = W2[i, n]
    pos = c > 0
    carried = pos & (a.abs() * c >= path)  # [inst, n, f]
    # pair[inst, n, i, j]
    big_in = a.abs().unsqueeze(-1) >= ratio * a.abs().unsqueeze(-2)
    big_out = c.unsqueeze(-2) >= ratio * c.unsqueeze(-1)
    pair = carried.unsqueeze(-1) & carried.unsqueeze(-2) & big_in & big_out
    eye = torch.eye(W1.shape[-1], dtype=torch.bool, device=W1.device)
    pair &= ~eye
    hits = pair.nonzero().tolist()
    out: list[Motif] = []
    for k, n, i, j in hits:
        leak = float(c[k, n, j] * a[k, n, i].abs())
        same_sign = torch.sign(a[k, :, i]) == torch.sign(a[k, n, i])
        fix = c[k, :, j] * a[k, :, i].abs()  # what each neuron writes to output j when feature i fires it
        fix = torch.where(same_sign, fix, torch.full_like(fix, math.inf))
        fix[n] = math.inf
        m = int(fix.argmin())
        cancelling = m if float(fix[m]) <= -cancel * leak else None
        out.append(Motif(k, n, (i, j), cancelling))
    return out


class Ternary(NamedTuple):
    """Fractions of untied weights in seed 001's three clusters, per instance."""

    pos: Float[Tensor, " inst"]
    """w ≥ strong · max|w| of its matrix."""
    neg: Float[Tensor, " inst"]
    """w ≤ −strong · max|w| of its matrix."""
    zero: Float[Tensor, " inst"]
    """|w| ≤ zero · max|w| of its matrix (the rest lies in between)."""


def ternary_fractions(
    W1: Float[Tensor, "inst hidden feats"],
    W2: Float[Tensor, "inst feats hidden"],
    strong: float = 0.5,
    zero: float = 0.1,
) -> Ternary:
    """The ternary-encoding statistic: pooled over W1 and W2, each matrix scaled by its own max |w| per instance."""
    parts = []
    for mat in (W1, W2):
        flat = mat.flatten(1)
        parts.append(flat / flat.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS))
    w = torch.cat(parts, dim=-1)
    return Ternary(
        (w >= strong).float().mean(dim=-1),
        (w <= -strong).float().mean(dim=-1),
        (w.abs() <= zero).float().mean(dim=-1),
    )


class PairCosines(NamedTuple):
    """Cosine between the two embedding directions of each pair (NaN where a direction is zero)."""

    correlated: Float[Tensor, "inst corr_pairs"]
    anticorrelated: Float[Tensor, "inst anti_pairs"]


def pair_cosines(W: Float[Tensor, "inst hidden feats"], n_correlated: int, n_anticorrelated: int) -> PairCosines:
    """cos(W_{2k}, W_{2k+1}) for the correlated pairs (first columns), then the anticorrelated pairs."""
    n = 2 * (n_correlated + n_anticorrelated)
    a, b = W[..., 0:n:2], W[..., 1:n:2]
    na, nb = a.norm(dim=-2), b.norm(dim=-2)
    cos = (a * b).sum(dim=-2) / (na * nb).clamp_min(_EPS)
    cos = torch.where((na > 0) & (nb > 0), cos, torch.full_like(cos, float("nan")))
    return PairCosines(cos[..., :n_correlated], cos[..., n_correlated:])


def effective_rank(W: Float[Tensor, "inst hidden feats"]) -> Float[Tensor, " inst"]:
    """exp(H(σ/Σσ)) over the singular values σ of W (Roy & Vetterli): k for k equal non-zero singular values."""
    s = torch.linalg.svdvals(W.double())
    q = s / s.sum(dim=-1, keepdim=True).clamp_min(_EPS)
    h = -(q * torch.log(q.clamp_min(1e-300))).sum(dim=-1)
    return torch.exp(h).to(W.dtype)


class Computation(NamedTuple):
    """How well a model computes each feature's label on its own (every other feature off)."""

    error: Float[Tensor, "inst feats"]
    """max over x_i in {-1, 0, 1} of |x'_i - y_i|: 0 for a perfectly computed feature."""
    nonlinear: Float[Tensor, "inst feats"]
    """x'_i(1) + x'_i(-1) - 2 x'_i(0): the even part of the response (ReLU(x): 1, |x|: 2, any linear response: 0)."""


@torch.no_grad()
def computation(model: ToyModel, spec: Experiment) -> Computation:
    """Probe each feature alone at x_i = -1, 0, 1 and compare the output with the label (signed-input tasks)."""
    from superposition.data import target_fn

    p = next(model.parameters())
    n, inst = spec.model.n_features, spec.n_instances
    eye = torch.eye(n, device=p.device, dtype=p.dtype)
    x = torch.cat([-eye, torch.zeros_like(eye), eye])[:, None, :].expand(3 * n, inst, n)  # (3n, inst, n)
    k = torch.tensor([float(v) for v in spec.instance_values("task.residual_factor")], device=p.device, dtype=p.dtype)
    idx = torch.arange(n, device=p.device)
    out = model(x).view(3, n, inst, n)[:, idx, :, idx]  # [feature, sign, inst]: the probed feature's own output
    y = target_fn(spec.task.target, x, k).view(3, n, inst, n)[:, idx, :, idx]
    error = (out - y).abs().amax(dim=1).transpose(0, 1)
    nonlinear = (out[:, 2] + out[:, 0] - 2 * out[:, 1]).transpose(0, 1)
    return Computation(error, nonlinear)


def abs_pairs(
    W1: Float[Tensor, "inst hidden feats"], W2: Float[Tensor, "inst feats hidden"], path: float = 0.1
) -> Float[Tensor, "inst feats"]:
    """1 where feature i has an antipodal neuron pair: neurons n, m whose strongest input is i, with W1[n,i] > 0 >
    W1[m,i] and both W2[i,n], W2[i,m] > 0, and each path |W1|·W2 at least ``path`` (seed 000's |x| circuit)."""
    n_feat = W1.shape[-1]
    top = W1.abs().argmax(dim=-1)  # (inst, hidden): each neuron's dominant feature
    w_in = W1.gather(-1, top.unsqueeze(-1)).squeeze(-1)
    w_out = W2.transpose(-1, -2).gather(-1, top.unsqueeze(-1)).squeeze(-1)
    good = (w_out > 0) & (w_in.abs() * w_out >= path)
    onehot = torch.nn.functional.one_hot(top, n_feat).to(W1.dtype)  # (inst, hidden, feats)
    pos = ((good & (w_in > 0)).to(W1.dtype).unsqueeze(-1) * onehot).sum(dim=-2) > 0
    neg = ((good & (w_in < 0)).to(W1.dtype).unsqueeze(-1) * onehot).sum(dim=-2) > 0
    return (pos & neg).to(W1.dtype)


def transplant_loss(model: ToyModel, spec: Experiment) -> np.ndarray:
    """Per-instance loss of ``models.transplant(model)`` on the same fresh evaluation samples as a run's ``loss``."""
    from superposition.models import transplant
    from superposition.train import TrainState, evaluate

    plain = transplant(model, spec)
    state = TrainState.create(plain.spec, next(model.parameters()).device)
    state.model.load_state_dict(plain.model.state_dict())
    return evaluate(state).double().cpu().numpy()


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=-1)
    count = mask.sum(dim=-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


@torch.no_grad()
def instance_metrics(model: ToyModel, spec: Experiment) -> dict[str, np.ndarray]:
    """Per-instance scalar metrics for the run's instances table (one array of length n_instances each).

    The columns are listed in this module's docstring.
    """
    from superposition.data import importance_tensor
    from superposition.theory import naive_loss

    def np_(t: Tensor) -> np.ndarray:
        return t.detach().double().cpu().numpy()

    W = model.encoder.detach().float()
    out: dict[str, np.ndarray] = {}
    rep = feature_norms(W) > 0.5
    out["n_represented"] = rep.sum(dim=-1).cpu().numpy().astype(np.int64)
    kind = model.kind
    untied = kind != "residual-mlp" and not model.tied
    W2 = model.W2.detach().float() if untied else None
    if kind in ("linear", "relu-output", "neuron", "mlp"):
        out["n_learned_diag"] = n_learned_diag(W, W2).cpu().numpy().astype(np.int64)
    out["dims_per_feature"] = np_(dims_per_feature(W))
    out["superposition"] = np_(_masked_mean(superposition(W), rep))
    out["eff_rank"] = np_(effective_rank(W))
    if kind in ("linear", "relu-output"):
        imp = importance_tensor(spec, W.device, W.dtype)
        split = loss_split(readout_matrix(W, W2), imp)
        out["benefit"] = np_(split.benefit)
        out["interference"] = np_(split.interference)
    out["naive_loss"] = naive_loss(spec) / spec.model.n_features
    if kind in ("neuron", "mlp", "residual-mlp"):
        mono = neuron_monosemanticity(W)
        live = ~torch.isnan(mono)
        mean = _masked_mean(torch.nan_to_num(mono), live)
        out["monosemanticity"] = np_(torch.where(live.any(dim=-1), mean, torch.full_like(mean, float("nan"))))
    nc, na = spec.n_pairs
    if (nc or na) and spec.data.kind != "hierarchy":
        cos = pair_cosines(W, nc, na)
        if nc:
            out["cos_corr"] = np_(cos.correlated).mean(axis=-1)
        if na:
            out["cos_anti"] = np_(cos.anticorrelated).mean(axis=-1)
    if W2 is not None:
        tern = ternary_fractions(W, W2)
        out["ternary_pos"], out["ternary_neg"], out["ternary_zero"] = np_(tern.pos), np_(tern.neg), np_(tern.zero)
        if kind in ("neuron", "mlp"):
            counts = np.zeros(spec.n_instances, dtype=np.int64)
            for motif in asymmetric_motifs(W, W2):
                counts[motif.instance] += 1
            out["n_motifs"] = counts
    if spec.data.magnitude == "signed" and kind in ("neuron", "mlp", "residual-mlp"):
        out["n_computed"] = (computation(model, spec).error < 0.25).sum(dim=-1).cpu().numpy().astype(np.int64)
    if W2 is not None and spec.task.target == "abs":
        out["n_abs_pairs"] = abs_pairs(W, W2).sum(dim=-1).cpu().numpy().astype(np.int64)
    m = spec.model
    if kind == "residual-mlp" and m.n_layers == 1 and m.embedding == "random-fixed":
        out["transplant_loss"] = transplant_loss(model, spec)
    return out
