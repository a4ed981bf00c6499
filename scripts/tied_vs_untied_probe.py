"""Issue 19 point 2: what makes the untied net of seed 001 learn all 20 features at S = 0.999?

    python scripts/tied_vs_untied_probe.py        # prints one line per variant; about 3 minutes on one CPU thread

Trains the preset's untied model (20 features, 5 hidden, importance 0.7^i, a fixed set of 20 000 unit-normalised
points, AdamW 1e-3 with decoupled weight decay 0.01, 10k steps) at S = 0.99 and 0.999, and variants that change one
thing each; counts learned features with today's rule (diag(W2 W1) > 0.5) and with readings of the seed's heatmap
(a diagonal entry visibly coloured on its +-1.3 scale: > 0.2, > 0.1), and the features whose encoder column has norm
> 0.5 (W1 reads them at all).
"""

from __future__ import annotations

import sys

import torch

from superposition import metrics
from superposition.record import finish, start_state
from superposition.spec import load_spec
from superposition.train import train_model

VARIANTS = {
    "preset": [],
    "30k steps": ["train.steps=30000"],
    "no weight decay": ["train.weight_decay=0.0"],
    "Adam, decay in the gradient (the seed's optimiser)": ['train.optimizer="adam"'],
    "no unit normalisation": ["data.normalize=false"],
    "fresh samples (no fixed set)": ["FRESH"],
    "fresh samples, 30k steps, no decay": ["FRESH", "train.steps=30000", "train.weight_decay=0.0"],
    "8 seeds at S = 0.999 (max, mean)": ["SEEDS"],
}


def counts(run) -> list[str]:
    enc = run.model.encoder.detach()  # (inst, hidden, feats)
    W2 = run.model.W2.detach() if hasattr(run.model, "W2") else None
    diag = metrics.learned_diag(enc, W2)  # diag(W2 W1), the diagonal the preset counts
    out = []
    for i in range(diag.shape[0]):
        d = diag[i]
        out.append(
            f"diag>0.5 {int((d > 0.5).sum())}, >0.2 {int((d > 0.2).sum())}, >0.1 {int((d > 0.1).sum())}, "
            f"|W1_i|>0.5 {int((enc[i].norm(dim=0) > 0.5).sum())}"
        )
    return out


def main() -> None:
    torch.set_num_threads(1)
    only = set(sys.argv[1:])
    for name, extra in VARIANTS.items():
        if only and name.split()[0] not in only:
            continue
        grid = "instances.data.feature_probability=[0.01, 0.001]"
        if "SEEDS" in extra:
            grid = "instances.seed=[0, 1, 2, 3, 4, 5, 6, 7]"
            extra = [*extra, "data.feature_probability=0.001"]
        sets = [e for e in extra if e not in ("FRESH", "SEEDS")]
        spec = load_spec("tied-vs-untied", ["model.tied=false", grid, *sets]).model_copy(update={"sweep": None})
        if "FRESH" in extra:
            spec = spec.model_copy(update={"data": spec.data.model_copy(update={"dataset_size": None})})
        state = start_state(spec)
        run = finish(state, train_model(state).seconds)
        c = counts(run)
        if "SEEDS" in extra:
            print(f"{name}: " + " | ".join(c), flush=True)
        else:
            print(f"{name}: S = 0.99: {c[0]}; S = 0.999: {c[1]}", flush=True)


if __name__ == "__main__":
    main()
