"""Issue 19's long runs on a GPU machine, without the report layer (plotly is not needed there).

    python scripts/device_issue19.py l1-computation OUT           # a run folder OUT/l1-computation
    python scripts/device_issue19.py l1-computation-scratch OUT   # a run folder OUT/l1-computation-scratch
    python scripts/device_issue19.py hierarchy OUT [cpu]          # OUT/hierarchy-init.json (default on cuda)

The hierarchy part isolates the init sensitivity of seed 002's table at tree depth 5: the early_stopping variant at
every d_hidden 2..10 (5 repeats, 10k steps, as the preset), under model.init = "per-instance" and "notebook".
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from superposition.record import finish, start_state, write_run_files
from superposition.spec import load_spec
from superposition.train import train_model


def train_folder(name: str, out: Path) -> str:
    spec = load_spec(name, ["device=cuda"])
    t = time.perf_counter()
    state = start_state(spec)
    run = finish(state, train_model(state).seconds)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    write_run_files(folder, run)
    return f"{name}: {time.perf_counter() - t:.0f} s on {state.engine}"


def hierarchy_point(init: str, d_hidden: int, device: str = "cuda") -> dict:
    overrides = [
        f"device={device}",
        "data.tree_depth=5",
        "model.n_features=62",
        "data.early_stopping=true",
        f"model.d_hidden={d_hidden}",
        f'model.init="{init}"',
        "instances.seed=[0, 1, 2, 3, 4]",
        'train.engine="eager"',
    ]
    spec = load_spec("hierarchy", overrides)
    spec = spec.model_copy(update={"sweep": None})
    state = start_state(spec)
    run = finish(state, train_model(state).seconds)
    loss = run.instances["loss"].to_numpy()
    return {"init": init, "d_hidden": d_hidden, "loss_min": float(loss.min()), "loss": loss.tolist()}


def main() -> int:
    what, out = sys.argv[1], Path(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
    out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch.__version__, flush=True)
    if what != "hierarchy":
        print(train_folder(what, out), flush=True)
        return 0
    rows = []
    if device == "cpu":
        torch.set_num_threads(1)
    with ThreadPoolExecutor(max_workers=6 if device == "cuda" else 2) as pool:  # eager steps overlap their kernels
        for row in pool.map(lambda a: hierarchy_point(*a, device), [(i, d) for i in INITS for d in range(2, 11)]):
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("init", "d_hidden", "loss_min")}), flush=True)
            (out / "hierarchy-init.json").write_text(json.dumps(rows, indent=1))
    return 0


INITS = ("per-instance", "notebook")

if __name__ == "__main__":
    sys.exit(main())
