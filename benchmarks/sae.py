"""SAE training throughput: the project's SAE training (``fit_sae``, each engine) against a plain eager PyTorch loop
of the same architecture written here, in the same process.

    python benchmarks/sae.py              # both shapes, every architecture -> the SAE table of docs/PERFORMANCE.md
    python benchmarks/sae.py --quick      # shorter blocks, printed only
    python benchmarks/sae.py --device cuda --json gpu-sae.json

The reference is the loop a notebook writes: fresh ``torch.rand`` features and mask every step, the toy model's
hidden activations by einsum, encode/decode by einsum, the architecture's loss, ``backward()``,
``torch.optim.Adam``, decoder rows renormalised (ReLU, Gated). It does no dead-latent bookkeeping or resampling;
the project's loop does (it is the real training loop, ``superposition.sae.fit_sae``). Blocks alternate (reference,
project, reference, ...) and the median is reported. The project's time per step excludes the first step's
compiling (reported apart); the eager engine's rows show what the fused step adds.

Shapes: ``sae-recovery`` (16 instances of a 5-in-2 toy model, three ReLU SAEs of 5 latents per instance, batch
1024) and ``sae-architectures`` (the same toy model; per architecture its sparsity list: 6 ReLU, 6 Gated,
6 JumpReLU, 3 TopK, 6 BatchTopK SAEs per instance).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from superposition.sae.fit import fit_sae
from superposition.sae.model import SparseAutoencoder
from superposition.spec import load_spec
from superposition.train import TrainState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import DOC, conditions, replace_block  # noqa: E402

SHAPES = {
    "sae-recovery": [("relu", None)],
    "sae-architectures": [("relu", None), ("gated", None), ("jumprelu", None), ("topk", None), ("batchtopk", None)],
}


# -- the reference: a plain eager loop per architecture ---------------------------------------------------------------
class _Jump(torch.autograd.Function):
    """JumpReLU / step with the rectangle-kernel straight-through gradient for the threshold."""

    @staticmethod
    def forward(ctx, pre, theta, eps, step):
        ctx.save_for_backward(pre, theta)
        ctx.eps, ctx.step = eps, step
        on = (pre > theta).to(pre.dtype)
        return on if step else pre * on

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        k = ((pre - theta).abs() < ctx.eps / 2).to(g.dtype) / ctx.eps
        g_theta = -(k * g * (1.0 if ctx.step else theta)).sum(0)
        g_pre = torch.zeros_like(pre) if ctx.step else g * (pre > theta).to(g.dtype)
        return g_pre, g_theta, None, None


class Reference:
    """Everything in (batch, inst, sae, ...) layout, as a notebook would write it."""

    def __init__(self, arch: str, sparsity: list[float], toy_w: torch.Tensor, p: float, d_sae: int, batch: int):
        self.arch, self.p, self.batch = arch, p, batch
        self.toy_w = toy_w  # (inst, hidden, feats)
        inst, d, self.n = toy_w.shape
        m = len(sparsity)
        dev = toy_w.device
        self.lam = torch.tensor(sparsity, device=dev)
        b = math.sqrt(6 / (d * d_sae))
        self.W_enc = ((torch.rand(inst, m, d, d_sae, device=dev) * 2 - 1) * b).requires_grad_()
        self.W_dec = ((torch.rand(inst, m, d_sae, d, device=dev) * 2 - 1) * b).requires_grad_()
        self.b_enc = torch.zeros(inst, m, d_sae, device=dev, requires_grad=True)
        self.b_dec = torch.zeros(inst, m, d, device=dev, requires_grad=True)
        params = [self.W_enc, self.W_dec, self.b_enc, self.b_dec]
        if arch == "jumprelu":
            self.log_t = torch.full((inst, m, d_sae), math.log(0.1), device=dev, requires_grad=True)
            params.append(self.log_t)
        if arch == "gated":
            self.r_mag = torch.zeros(inst, m, d_sae, device=dev, requires_grad=True)
            self.b_mag = torch.zeros(inst, m, d_sae, device=dev, requires_grad=True)
            params += [self.r_mag, self.b_mag]
        self.opt = torch.optim.Adam(params, lr=1e-3)

    def step(self) -> None:
        inst, n, dev = self.toy_w.shape[0], self.n, self.toy_w.device
        x = torch.rand(self.batch, inst, n, device=dev) * (torch.rand(self.batch, inst, n, device=dev) < self.p)
        h = torch.einsum("bif,idf->bid", x, self.toy_w)
        norm = self.arch in ("relu", "gated")
        dec = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True) if norm else self.W_dec
        xc = h[:, :, None] - self.b_dec
        xw = torch.einsum("bimd,imds->bims", xc, self.W_enc)
        pre = xw + self.b_enc
        lam = self.lam
        penalty = 0.0
        if self.arch == "relu":
            z = torch.relu(pre)
            penalty = lam * z.sum(-1)
        elif self.arch == "topk":
            k = int(self.lam.max())
            v, i = pre.topk(k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        elif self.arch == "batchtopk":
            flat = pre.permute(1, 2, 0, 3).reshape(inst, pre.shape[2], -1)
            kb = int(round(float(self.lam.max()) * self.batch))
            v, i = flat.topk(kb, dim=-1)
            z = torch.zeros_like(flat).scatter(-1, i, torch.relu(v)).reshape(inst, pre.shape[2], self.batch, -1)
            z = z.permute(2, 0, 1, 3)
        elif self.arch == "jumprelu":
            theta = self.log_t.exp()
            z = _Jump.apply(pre, theta, 0.01, False)
            penalty = lam * _Jump.apply(pre, theta, 0.01, True).sum(-1)
        else:
            gate = torch.relu(pre)
            z = (pre > 0).to(pre.dtype) * torch.relu(xw * self.r_mag.exp() + self.b_mag)
            aux = torch.einsum("bims,imsd->bimd", gate, dec.detach()) + self.b_dec.detach()
            penalty = lam * gate.sum(-1) + (aux - h[:, :, None]).square().mean(-1)
        recon = torch.einsum("bims,imsd->bimd", z, dec) + self.b_dec
        loss = ((recon - h[:, :, None]).square().mean(-1) + penalty).mean(0).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if norm:
            with torch.no_grad():
                self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)


# -- measuring --------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ref_rate(ref: Reference, n: int, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        ref.step()
    _sync(device)
    return n / (time.perf_counter() - t)


def _project_rate(sae_spec, arch, run, toy, n_inst: int, d_in: int, device) -> tuple[float, float]:
    """(steps/s excluding the first step's compiling, compile seconds) of one fit_sae call."""
    sae = SparseAutoencoder(sae_spec, arch, n_inst, d_in).to(device)
    fitted = fit_sae(sae, toy, run, sae_spec)
    return (sae_spec.steps - 1) / max(fitted.seconds - fitted.compile_seconds, 1e-9), fitted.compile_seconds


def measure(shape: str, arch: str, device: torch.device, repeats: int, steps: int, log) -> dict:
    run = load_spec(shape, ["train.steps=1", f"device={device.type}"])
    toy = TrainState.create(run, device).model
    toy.requires_grad_(False)
    base = run.sae.for_architecture(arch)
    if shape == "sae-architectures":
        base = base.model_copy(update={"resample_method": "loss-weighted"})
    sparsity = base.sparsity_values(arch) * len(base.resample_methods)
    d_in = run.model.d_hidden
    ref = Reference(arch, sparsity, toy.W.detach().clone(), run.data.feature_probability, base.d_sae, base.batch_size)
    for _ in range(20):
        ref.step()
    row = {"shape": shape, "architecture": arch, "saes_per_instance": len(sparsity), "instances": run.n_instances}
    for engine in ("fast", "eager"):
        spec = base.model_copy(update={"engine": engine, "steps": steps if engine == "fast" else max(steps // 5, 50)})
        refs, ours, comp = [], [], []
        for _ in range(repeats):
            refs.append(_ref_rate(ref, max(20, spec.steps // 2), device))
            rate, c = _project_rate(spec, arch, run, toy, run.n_instances, d_in, device)
            ours.append(rate)
            comp.append(c)
        row[f"ref_steps_s_{engine}"] = statistics.median(refs)
        row[f"{engine}_steps_s"] = statistics.median(ours)
        row[f"{engine}_ratio"] = statistics.median(ours) / statistics.median(refs)
        if engine == "fast":
            row["compile_s"] = statistics.median(comp)
        log(
            f"{shape} {arch} x{len(sparsity)}: reference {row[f'ref_steps_s_{engine}']:.0f} steps/s, "
            f"{engine} {row[f'{engine}_steps_s']:.0f} steps/s, ratio {row[f'{engine}_ratio']:.2f}x"
            + (f", compile {row['compile_s']:.1f} s" if engine == "fast" else "")
        )
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | architecture | SAEs per instance | reference eager loop (steps/s) | project, fast (steps/s) | "
        "ratio | project, eager engine (steps/s) | ratio | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['architecture']} | {r['saes_per_instance']} × {r['instances']} | "
            f"{r['ref_steps_s_fast']:.0f} | {r['fast_steps_s']:.0f} | **{r['fast_ratio']:.1f}×** | "
            f"{r['eager_steps_s']:.0f} | {r['eager_ratio']:.2f}× | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter blocks, nothing written")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=0, help="alternating blocks per loop (default 1 quick, 3 full)")
    ap.add_argument("--steps", type=int, default=0, help="steps per project block (default 500 quick, 3000 full)")
    ap.add_argument("--only", default="", help="comma-separated architectures")
    ap.add_argument("--json", default="", help="write the raw results here")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/PERFORMANCE.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (500 if args.quick else 3000)
    only = {a for a in args.only.split(",") if a}
    cond = conditions(device)
    print(f"conditions: {cond}", flush=True)
    rows = []
    for shape, archs in SHAPES.items():
        for arch, _ in archs:
            if only and arch not in only:
                continue
            rows.append(measure(shape, arch, device, repeats, steps, lambda m: print(m, flush=True)))
            if args.json:
                Path(args.json).write_text(json.dumps({"conditions": cond, "rows": rows}, indent=1), encoding="utf-8")
    print(table(rows))
    if not args.quick and not args.no_doc and device.type == "cpu":
        text = DOC.read_text(encoding="utf-8")
        body = f"Conditions: `{json.dumps(cond)}`\n\n" + table(rows)
        DOC.write_text(replace_block(text, "sae-table", body), encoding="utf-8")
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
