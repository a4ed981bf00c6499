"""Closed forms and exact expected losses: naive baselines, the linear loss identity, phase diagrams.

Conventions. Losses here are the paper's: a **sum** over features, Σ_i I_i E[(y_i − x'_i)²]. A run's ``loss`` column
is the mean over features, i.e. this sum divided by n_features. Data: each feature is active with probability p
(independent, or in correlated / anticorrelated pairs), an active feature's value follows the magnitude law
(``uniform`` U[0,1], ``signed`` U[−1,1], ``normal`` clip(0.5 + 0.2·N(0,1), 0, 1)).

The exact expected loss of the ReLU-output model (a sum over activity patterns of truncated-power expectations) and
the best bias are derived in :mod:`superposition.theory.exact`.

The package by idea (each module imports only those above it)::

    exact.py         the data law (magnitude_expectation, patterns and their probabilities), the exact pattern table
                     of the ReLU-output model and its Monte Carlo twin, config_loss, best_bias
    baselines.py     naive baselines: dropped_feature_cost, naive_loss, tmcc_naive_loss
    closed_forms.py  linear_expected_loss, the 2-features-in-1-dimension closed forms (regimes, boundary)
    diagram.py       candidate configurations, classify_geometry, symmetry_classes, analytic_phase_diagram
"""

from __future__ import annotations

from superposition.theory.baselines import dropped_feature_cost, naive_loss, naive_loss_from_costs, tmcc_naive_loss
from superposition.theory.closed_forms import (
    TRIPLE_POINT,
    TWO_BY_ONE_REGIMES,
    TwoByOne,
    linear_expected_loss,
    two_by_one_boundary,
    two_by_one_losses,
    two_by_one_regime,
)
from superposition.theory.diagram import (
    CONVENTIONS,
    NORM_FLOOR,
    Candidate,
    PhaseDiagram,
    analytic_phase_diagram,
    candidates,
    classify_geometry,
    symmetry_classes,
)
from superposition.theory.exact import (
    DTYPE,
    MAGNITUDES,
    ConfigLoss,
    MCTable,
    best_bias,
    config_loss,
    expected_loss,
    magnitude_expectation,
    mc_loss_table,
    pattern_probabilities,
    patterns,
    relu_output_table,
)

__all__ = [
    "magnitude_expectation",
    "dropped_feature_cost",
    "naive_loss_from_costs",
    "naive_loss",
    "tmcc_naive_loss",
    "linear_expected_loss",
    "TwoByOne",
    "two_by_one_losses",
    "two_by_one_regime",
    "two_by_one_boundary",
    "TWO_BY_ONE_REGIMES",
    "TRIPLE_POINT",
    "patterns",
    "pattern_probabilities",
    "relu_output_table",
    "MCTable",
    "mc_loss_table",
    "expected_loss",
    "ConfigLoss",
    "config_loss",
    "best_bias",
    "Candidate",
    "candidates",
    "classify_geometry",
    "symmetry_classes",
    "NORM_FLOOR",
    "PhaseDiagram",
    "analytic_phase_diagram",
    "CONVENTIONS",
    # also re-exported (module constants of the single module)
    "DTYPE",
    "MAGNITUDES",
]
