"""Training throughput: the fast engine against a plain eager PyTorch loop, and against the machine's matmul peak.

    python benchmarks/throughput.py               # full run: table, bf16 rows, scaling sweep -> docs/PERFORMANCE.md
    python benchmarks/throughput.py --quick       # under a minute: three configs, short timings, printed table
    python benchmarks/throughput.py --device cuda --json gpu.json   # GPU rows (merged into the doc by a CPU run)

Both loops run in this one process, alternating (reference block, fast block, reference block, ...) after a
warm-up, and the median of the repeats is reported, so a busy machine slows both alike. The reference is the loop
every public toy-model notebook writes: fresh ``torch.rand`` data and mask each step, einsum forward, the loss per
instance summed, ``backward()``, ``torch.optim.Adam``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from superposition.spec import parse_spec
from superposition.train import TrainState

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PERFORMANCE.md"
RESULTS = ROOT / "benchmarks" / "results"


# -- configurations -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    name: str
    inst: int
    feats: int
    hidden: int
    kind: str = "relu-output"
    batch: int = 1024
    p: float = 0.05
    target: str = "identity"
    signed: bool = False
    d_embed: int = 0
    dtype: str = "float32"

    @property
    def label(self) -> str:
        shape = f"{self.inst}×{self.feats}×{self.hidden}"
        if self.kind == "residual-mlp":
            shape = f"{self.inst}×{self.feats}, d_embed {self.d_embed}, {self.hidden} neurons"
        extra = {"mlp": " untied MLP abs(x)", "residual-mlp": " residual MLP"}.get(self.kind, "")
        return f"{self.name} {shape}{extra}, batch {self.batch}" + (" bf16" if self.dtype == "bfloat16" else "")

    def spec(self, device: str, steps: int = 1_000_000, engine: str = "fast"):
        model = {"kind": self.kind, "n_features": self.feats, "d_hidden": self.hidden}
        if self.kind == "residual-mlp":
            model.update(d_embed=self.d_embed)
        return parse_spec(
            {
                "name": self.name,
                "device": device,
                "dtype": self.dtype,
                "model": model,
                "data": {"feature_probability": self.p, "magnitude": "signed" if self.signed else "uniform"},
                "task": {"importance": 0.9, "target": self.target},
                "train": {"batch_size": self.batch, "steps": steps, "engine": engine, "log_every": steps},
                "instances": {"seed": list(range(self.inst))},
            }
        )


CONFIGS = [
    Config("A", 7, 10, 5),
    Config("B", 7, 100, 40, kind="mlp", target="abs", signed=True),
    Config("C1", 400, 2, 1),
    Config("C2", 400, 20, 5),
    Config("D", 20, 400, 30),
    Config(
        "TMCC", 1, 100, 50, kind="residual-mlp", batch=2048, p=0.01, target="relu-plus-x", signed=True, d_embed=1000
    ),
]
TARGETS = {"A": 8, "B": 4, "C1": 13, "C2": 6, "D": 4}
BF16 = ["A", "C2", "D"]
SCALING_INSTANCES = [1, 4, 16, 64, 256, 1024, 4096]
SCALING_MODELS = [(2, 1), (20, 5)]


# -- the reference loop -----------------------------------------------------------------------------------------------
class Reference:
    """A toy-model training loop as a notebook writes it (not the package's code)."""

    def __init__(self, c: Config, device: torch.device):
        dt = torch.bfloat16 if c.dtype == "bfloat16" else torch.float32
        self.c, self.device, self.dt = c, device, dt
        inst, n, h = c.inst, c.feats, c.hidden

        def param(*shape, init):
            t = torch.empty(*shape, device=device)
            init(t)
            return torch.nn.Parameter(t.to(dt))

        if c.kind == "residual-mlp":
            e = c.d_embed
            w_e = torch.randn(inst, n, e, device=device)
            self.W_E = (w_e / w_e.norm(dim=-1, keepdim=True)).to(dt)
            bound = 1 / math.sqrt(e)
            self.W_in = param(inst, h, e, init=lambda t: t.uniform_(-bound, bound))
            self.W_out = param(inst, e, h, init=lambda t: t.uniform_(-1 / math.sqrt(h), 1 / math.sqrt(h)))
            params = [self.W_in, self.W_out]
        elif c.kind == "mlp":
            self.W1 = param(inst, h, n, init=lambda t: t.uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n)))
            self.W2 = param(inst, n, h, init=lambda t: t.uniform_(-1 / math.sqrt(h), 1 / math.sqrt(h)))
            self.b_final = param(inst, n, init=torch.nn.init.zeros_)
            params = [self.W1, self.W2, self.b_final]
        else:
            self.W = param(inst, h, n, init=torch.nn.init.xavier_normal_)
            self.b_final = param(inst, n, init=torch.nn.init.zeros_)
            params = [self.W, self.b_final]
        self.params = params
        self.importance = (0.9 ** torch.arange(n, device=device)).to(dt)
        self.p = torch.full((inst,), c.p, device=device)
        self.opt = torch.optim.Adam(params, lr=1e-3)

    def step(self) -> None:
        c = self.c
        shape = (c.batch, c.inst, c.feats)
        x = torch.rand(shape, device=self.device, dtype=self.dt)
        if c.signed:
            x = x * 2 - 1
        mask = torch.rand(shape, device=self.device) < self.p[None, :, None]
        x = torch.where(mask, x, torch.zeros_like(x))
        if c.kind == "residual-mlp":
            r = torch.einsum("bif,ife->bie", x, self.W_E)
            a = torch.relu(torch.einsum("bie,ihe->bih", r, self.W_in))
            r = r + torch.einsum("bih,ieh->bie", a, self.W_out)
            out = torch.einsum("bie,ife->bif", r, self.W_E)
            y = torch.relu(x) + x
        elif c.kind == "mlp":
            h = torch.relu(torch.einsum("bif,ihf->bih", x, self.W1))
            out = torch.relu(torch.einsum("bih,ifh->bif", h, self.W2) + self.b_final)
            y = x.abs()
        else:
            h = torch.einsum("bif,ihf->bih", x, self.W)
            out = torch.relu(torch.einsum("bih,ihf->bif", h, self.W) + self.b_final)
            y = x
        loss = (self.importance * (y - out) ** 2).mean(dim=(0, 2)).sum()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def state_bytes(self) -> int:
        extra = self.W_E.numel() * self.W_E.element_size() if self.c.kind == "residual-mlp" else 0
        return 3 * sum(p.numel() * p.element_size() for p in self.params) + extra


# -- work per step ---------------------------------------------------------------------------------------------------
def flops(c: Config, engine: str) -> float:
    """Matmul FLOPs one training step executes (2 per multiply-add): forward and backward products."""
    b, i, n, h = c.batch, c.inst, c.feats, c.hidden
    if c.kind != "residual-mlp":
        return 2.0 * 5 * b * i * n * h  # forward: encode, decode; backward: three products of the same size
    e = c.d_embed
    if engine == "reference":
        # Through the full width: embed, W_in, W_out, unembed; backward: unembed, W_out (2), W_in (1).
        return 2.0 * i * (3 * b * n * e + 5 * b * e * h)
    k0, k1 = n, n + h  # the fast engine works in (features + neurons) coefficient space
    fwd = k0 * e * h + b * k0 * h + k1 * e * n + b * k1 * n
    bwd = 2 * b * k1 * n + k1 * n * e + 2 * b * k0 * h + 2 * k0 * h * e
    return 2.0 * i * (fwd + bwd)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of large square matmuls (this size and half of it): this machine's practical compute roof.

    The best, not the median: on a shared machine the neighbours only ever slow a matmul down.
    """
    best = 0.0
    for n in (size // 2, size):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(repeats + 1):
            _sync(device)
            t = time.perf_counter()
            torch.matmul(a, b)
            _sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def gemm_only(c: Config, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of the step's five batched products timed alone (same shapes and layouts as the fast engine's):
    the roof that a step made of these BLAS calls cannot pass, whatever else it fuses. NaN where the fast engine
    computes the products as fused loops instead (tiny models) or in coefficient space (residual MLP)."""
    if c.kind == "residual-mlp" or c.feats * c.hidden <= 128:
        return float("nan")
    dt = torch.bfloat16 if c.dtype == "bfloat16" else torch.float32
    i, n, h, b = c.inst, c.feats, c.hidden, c.batch
    w = torch.randn(i, h, n, device=device, dtype=dt)
    x, d = torch.randn(i, n, b, device=device, dtype=dt), torch.randn(i, n, b, device=device, dtype=dt)
    a = torch.randn(i, h, b, device=device, dtype=dt)
    products = [
        lambda: torch.matmul(w, x),  # encode
        lambda: torch.matmul(w.transpose(-1, -2), a),  # decode
        lambda: torch.matmul(d, a.transpose(-1, -2)),  # decoder gradient
        lambda: torch.matmul(w, d),  # hidden gradient
        lambda: torch.matmul(a, x.transpose(-1, -2)),  # encoder gradient
    ]
    total = 0.0
    for f in products:
        f()
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            best = min(best, time.perf_counter() - t)
        total += best
    return flops(c, "fast") / total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing ----------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    config: str
    label: str
    dtype: str
    ref_steps_s: float
    fast_steps_s: float
    ratio: float
    ref_gflops: float
    fast_gflops: float
    fast_peak_fraction: float
    ref_peak_fraction: float
    fast_warmup_s: float
    ref_warmup_s: float
    fast_memory_mb: float
    ref_memory_mb: float
    auto_engine_10k: str
    target: float | None
    ref_samples: list[float] = field(default_factory=list)
    fast_samples: list[float] = field(default_factory=list)
    gemm_only_gflops: float = float("nan")
    ref_cpu_steps_s: float = float("nan")
    fast_cpu_steps_s: float = float("nan")
    cpu_ratio: float = float("nan")


def _block(fn, n: int, device: torch.device, cpu: list[float] | None = None) -> float:
    """Steps per wall-clock second over ``n`` steps; appends steps per CPU-second (all threads) to ``cpu``."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    _sync(device)
    if cpu is not None:
        cpu.append(n / max(time.process_time() - c, 1e-9))
    return n / (time.perf_counter() - t)


def _steps_for(rate: float, seconds: float) -> int:
    return int(min(5000, max(1, round(rate * seconds))))


def _memory(fn, device: torch.device) -> float:
    """Peak bytes allocated during one step beyond what was live before it (MB)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are charged to the op that made them (self bytes, so nested ops are not counted twice), frees
    # appear as "[memory]" events with negative bytes: replayed in time order they give the live bytes.
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in changes:
        live += delta
        peak = max(peak, live)
    return peak / 2**20


def measure(
    c: Config, device: torch.device, repeats: int, block_s: float, peaks: dict[str, float], memory: bool = True
) -> Row:
    """Warm up both loops, then time them alternating; median steps/s of ``repeats`` blocks each."""
    ref = Reference(c, device)
    t = time.perf_counter()
    for _ in range(3):
        ref.step()
    _sync(device)
    ref_warm = time.perf_counter() - t
    state = TrainState.create(c.spec(str(device)), device)
    t = time.perf_counter()
    state.train_step()
    _sync(device)
    fast_warm = time.perf_counter() - t
    for _ in range(2):
        state.train_step()
    ref_rate = _block(ref.step, 2, device)
    fast_rate = _block(state.train_step, 5, device)
    n_ref, n_fast = _steps_for(ref_rate, block_s), _steps_for(fast_rate, block_s)
    ref_s, fast_s, ref_cpu, fast_cpu = [], [], [], []
    for _ in range(repeats):
        ref_s.append(_block(ref.step, n_ref, device, ref_cpu))
        fast_s.append(_block(state.train_step, n_fast, device, fast_cpu))
    ref_med, fast_med = statistics.median(ref_s), statistics.median(fast_s)
    mem_ref = _memory(ref.step, device) + ref.state_bytes() / 2**20 if memory else float("nan")
    state_bytes = sum(3 * v.numel() * v.element_size() for v in state.model.state_dict().values())
    mem_fast = _memory(state.train_step, device) + state_bytes / 2**20 if memory else float("nan")
    peak = peaks[c.dtype]
    from superposition.fast import choose_engine

    auto = choose_engine(c.spec(str(device), steps=10_000, engine="auto"), device).engine
    return Row(
        config=c.name,
        label=c.label,
        dtype=c.dtype,
        ref_steps_s=ref_med,
        fast_steps_s=fast_med,
        ratio=fast_med / ref_med,
        ref_gflops=flops(c, "reference") * ref_med / 1e9,
        fast_gflops=flops(c, "fast") * fast_med / 1e9,
        fast_peak_fraction=flops(c, "fast") * fast_med / peak,
        ref_peak_fraction=flops(c, "reference") * ref_med / peak,
        fast_warmup_s=fast_warm,
        ref_warmup_s=ref_warm,
        fast_memory_mb=mem_fast,
        ref_memory_mb=mem_ref,
        auto_engine_10k=auto,
        target=TARGETS.get(c.name) if c.dtype == "float32" else None,
        ref_samples=ref_s,
        fast_samples=fast_s,
        ref_cpu_steps_s=statistics.median(ref_cpu),
        fast_cpu_steps_s=statistics.median(fast_cpu),
        cpu_ratio=statistics.median(fast_cpu) / statistics.median(ref_cpu),
        gemm_only_gflops=gemm_only(c, device) / 1e9,
    )


def scaling(device: torch.device, block_s: float, repeats: int, log) -> list[dict]:
    """steps/s of both loops against the number of instances (2×1 and 20×5 models)."""
    out = []
    for n, h in SCALING_MODELS:
        for inst in SCALING_INSTANCES:
            c = Config(f"{n}x{h}", inst, n, h)
            ref = Reference(c, device)
            t = time.perf_counter()
            ref.step()
            _sync(device)
            one = time.perf_counter() - t
            state = TrainState.create(c.spec(str(device)), device)
            for _ in range(3):
                state.train_step()
            fast_s, ref_s = [], []
            n_fast = _steps_for(_block(state.train_step, 3, device), block_s)
            n_ref = _steps_for(1 / max(one, 1e-6), block_s)
            for _ in range(repeats):
                if one < 10:
                    ref_s.append(_block(ref.step, n_ref, device))
                fast_s.append(_block(state.train_step, n_fast, device))
            row = {
                "model": f"{n}×{h}",
                "instances": inst,
                "ref_steps_s": statistics.median(ref_s) if ref_s else None,
                "fast_steps_s": statistics.median(fast_s),
            }
            log(f"  scaling {row}")
            out.append(row)
            del ref, state
    return out


# -- the bf16 effect on results ----------------------------------------------------------------------------------------
def bf16_effect(device: torch.device, steps: int) -> dict:
    """Train the paper's first figure (20 features in 5 dims) in float32 and bfloat16 with the fast engine."""
    from superposition.runs import train

    out = {}
    for dtype in ("float32", "bfloat16"):
        spec = parse_spec(
            {
                "device": str(device),
                "dtype": dtype,
                "model": {"n_features": 20, "d_hidden": 5},
                "task": {"importance": 0.7},
                "train": {"steps": steps, "optimizer": "adamw", "weight_decay": 0.01, "engine": "fast"},
                "instances": {"model.kind": ["linear", "relu-output"], "data.feature_probability": [1.0, 0.1, 0.01]},
            }
        )
        run = train(spec)
        df = run.instances
        out[dtype] = {
            "n_represented": df["n_represented"].tolist(),
            "loss": df["loss"].tolist(),
            "model.kind": df["model.kind"].tolist(),
            "p": df["data.feature_probability"].tolist(),
        }
    return out


# -- output ----------------------------------------------------------------------------------------------------------
def conditions(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = _cpu_name()
        info["cores"] = os.cpu_count()
        info["load_average_1m"] = os.getloadavg()[0]
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(rows: list[dict]) -> str:
    head = (
        "| config | reference steps/s | fast steps/s | ratio | target | ratio of CPU time | fast GFLOP/s "
        "| its products alone GFLOP/s | fast % of peak | ref % of peak | fast compile/warm-up s "
        "| step memory MB ref / fast | auto engine (10k steps) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"
    )
    lines = []
    for r in rows:
        target = f"≥ {r['target']}×" if r.get("target") else ""
        lines.append(
            f"| {r['label']} | {r['ref_steps_s']:.1f} | {r['fast_steps_s']:.1f} | **{r['ratio']:.1f}×** | {target} "
            f"| {r.get('cpu_ratio', float('nan')):.1f}× | {r['fast_gflops']:.2f} | {_num(r.get('gemm_only_gflops'))} "
            f"| {100 * r['fast_peak_fraction']:.1f}% | {100 * r['ref_peak_fraction']:.1f}% "
            f"| {r['fast_warmup_s']:.1f} | {r['ref_memory_mb']:.1f} / {r['fast_memory_mb']:.1f} "
            f"| {r['auto_engine_10k']} |"
        )
    return head + "\n".join(lines) + "\n"


def _num(v: float | None) -> str:
    return "—" if v is None or v != v else f"{v:.1f}"


def scaling_table(points: list[dict]) -> str:
    lines = ["| model | instances | reference steps/s | fast steps/s | ratio | fast instance-steps/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for p in points:
        ref = p["ref_steps_s"]
        ratio = f"{p['fast_steps_s'] / ref:.1f}×" if ref else "—"
        ref_s = f"{ref:.2f}" if ref else "— (one step > 10 s)"
        lines.append(
            f"| {p['model']} | {p['instances']} | {ref_s} | {p['fast_steps_s']:.2f} | {ratio} "
            f"| {p['fast_steps_s'] * p['instances']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def scaling_svg(points: list[dict], title: str) -> str:
    """A small log-log line plot of steps/s against instances, as standalone SVG (no plotting dependency)."""
    w, h, left, right, top, bottom = 720, 440, 70, 170, 40, 50
    xs = [p["instances"] for p in points]
    ys = [v for p in points for v in (p["ref_steps_s"], p["fast_steps_s"]) if v]
    x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))

    def px(x: float) -> float:
        return left + (math.log10(x) - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return h - bottom - (math.log10(y) - y0) / (y1 - y0) * (h - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
    ]
    for e in range(y0, y1 + 1):
        y = py(10**e)
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">1e{e}</text>')
    for x in sorted(set(xs)):
        parts.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{h - bottom}" stroke="#eee"/>')
        parts.append(f'<text x="{px(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{x}</text>')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">instances</text>')
    parts.append(
        f'<text x="16" y="{h / 2}" text-anchor="middle" transform="rotate(-90 16 {h / 2})">steps per second</text>'
    )
    colours = {"2×1": "#1f77b4", "20×5": "#d62728"}
    legend_y = top + 10
    for model in dict.fromkeys(p["model"] for p in points):
        for key, dash, name in (("fast_steps_s", "", "fast"), ("ref_steps_s", "6,4", "reference")):
            pts = [(px(p["instances"]), py(p[key])) for p in points if p["model"] == model and p[key]]
            if not pts:
                continue
            colour = colours.get(model, "#333")
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(
                f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>'
            )
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in pts]
            lx = w - right + 12
            parts.append(
                f'<line x1="{lx}" x2="{lx + 24}" y1="{legend_y}" y2="{legend_y}" stroke="{colour}" '
                f'stroke-width="2" stroke-dasharray="{dash}"/>'
            )
            parts.append(f'<text x="{lx + 30}" y="{legend_y + 4}">{model} {name}</text>')
            legend_y += 18
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def replace_block(text: str, name: str, body: str) -> str:
    """Replace the text between <!-- name:begin --> and <!-- name:end --> (append the block if missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    return text.rstrip() + "\n\n" + block + "\n"


def write_doc(results: dict, gpu: dict | None) -> None:
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Training throughput\n"
    cond = results["conditions"]
    text = replace_block(
        text,
        "cpu-conditions",
        f"Measured {cond['date']} on {cond['cpu']} ({cond['cores']} cores, torch {cond['torch']}, "
        f"{cond['threads']} threads), load average {cond['load_average_1m']:.1f} at the start; matmul peak "
        f"{results['peaks']['float32'] / 1e9:.0f} GFLOP/s fp32, {results['peaks']['bfloat16'] / 1e9:.0f} GFLOP/s bf16 "
        f"(best of {results['peak_size'] // 2}² and {results['peak_size']}² matmuls, timed at the start and the end "
        "of the run).",
    )
    text = replace_block(text, "cpu-table", table(results["rows"]))
    if results.get("scaling"):
        text = replace_block(text, "scaling-table", scaling_table(results["scaling"]))
        svg = scaling_svg(results["scaling"], "steps/s against instances (CPU, batch 1024)")
        (DOC.parent / "throughput_scaling.svg").write_text(svg, encoding="utf-8")
    if results.get("bf16_effect"):
        text = replace_block(text, "bf16-effect", bf16_table(results["bf16_effect"]))
    if gpu:
        gc = gpu["conditions"]
        text = replace_block(
            text,
            "gpu-conditions",
            f"Measured {gc['date']} on {gc['gpu']} (torch {gc['torch']}); matmul peak "
            f"{gpu['peaks']['float32'] / 1e12:.1f} TFLOP/s fp32 and {gpu['peaks']['bfloat16'] / 1e12:.0f} TFLOP/s "
            f"bf16 (best of a {gpu['peak_size']}² matmul in the same run).",
        )
        text = replace_block(text, "gpu-table", table(gpu["rows"]))
        if gpu.get("scaling"):
            text = replace_block(text, "gpu-scaling-table", scaling_table(gpu["scaling"]))
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")


def bf16_table(effect: dict) -> str:
    lines = ["| model | p | n_represented fp32 | n_represented bf16 | loss fp32 | loss bf16 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    a, b = effect["float32"], effect["bfloat16"]
    for i in range(len(a["loss"])):
        lines.append(
            f"| {a['model.kind'][i]} | {a['p'][i]} | {a['n_represented'][i]} | {b['n_represented'][i]} "
            f"| {a['loss'][i]:.4g} | {b['loss'][i]:.4g} |"
        )
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="under a minute: A, C1, D with short timings")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default="", help="comma-separated subset, e.g. A,C1")
    ap.add_argument("--repeats", type=int, default=0, help="timed blocks per loop (default 3 quick, 7 full)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the instance sweep")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 rows")
    ap.add_argument("--no-effect", action="store_true", help="skip the bf16-vs-fp32 training comparison")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both loops (default: torch's)")
    ap.add_argument("--json", default="", help="write the raw results here")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/PERFORMANCE.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    quick = args.quick
    repeats = args.repeats or (3 if quick else 7)
    block_s = 0.25 if quick else 1.0
    names = [s for s in args.configs.split(",") if s] or (["A", "C1", "D"] if quick else [c.name for c in CONFIGS])
    unknown = set(names) - {c.name for c in CONFIGS}
    if unknown:
        print(f"error: unknown config(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    cond = conditions(device)
    log(f"conditions: {cond}")
    if device.type == "cpu" and torch.get_num_threads() > 1 and cond["load_average_1m"] > 0.75 * (os.cpu_count() or 1):
        log(
            f"note: the machine is busy (load {cond['load_average_1m']:.1f} on {os.cpu_count()} cores); multi-threaded "
            "eager ops then wait at every OpenMP barrier and the reference slows down 10-100x: use --threads 1 "
            "for a comparison that holds"
        )
    size = 8192 if device.type == "cuda" else (1024 if quick else 3072)
    peaks = {"float32": matmul_peak(device, torch.float32, size)}
    peaks["bfloat16"] = peaks["float32"] if quick else matmul_peak(device, torch.bfloat16, size)
    log(f"matmul peak: {peaks['float32'] / 1e9:.1f} GFLOP/s fp32, {peaks['bfloat16'] / 1e9:.1f} GFLOP/s bf16")
    configs = [c for c in CONFIGS if c.name in names]
    if not quick and not args.no_bf16:
        configs += [Config(**{**asdict(c), "dtype": "bfloat16"}) for c in CONFIGS if c.name in BF16 and c.name in names]
    rows = []
    for c in configs:
        t = time.perf_counter()
        try:
            row = measure(c, device, repeats, block_s, peaks, memory=not quick)
        except Exception as exc:  # noqa: BLE001 - one failing config must not lose the others' numbers
            log(f"{c.label}: FAILED {exc.__class__.__name__}: {exc}")
            continue
        rows.append(asdict(row))
        if args.json:  # after every row, so a run cut short still leaves its numbers
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            partial = {"conditions": cond, "peaks": peaks, "peak_size": size, "rows": rows}
            Path(args.json).write_text(json.dumps(partial, indent=1), encoding="utf-8")
        log(
            f"{c.label}: reference {row.ref_steps_s:.1f} steps/s, fast {row.fast_steps_s:.1f} steps/s, "
            f"ratio {row.ratio:.1f}x (target {row.target or '-'}; CPU-time ratio {row.cpu_ratio:.1f}x), "
            f"fast {row.fast_gflops:.2f} GFLOP/s (its products alone {row.gemm_only_gflops:.1f}) "
            f"= {100 * row.fast_peak_fraction:.1f}% of peak, compile/warm-up {row.fast_warmup_s:.1f} s, "
            f"step memory ref {row.ref_memory_mb:.1f} MB / fast {row.fast_memory_mb:.1f} MB "
            f"[{time.perf_counter() - t:.0f} s]"
        )
    # The roof again at the end (the neighbours' load changes during a long run); fractions use the best of both.
    for dt, torch_dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        if not quick:
            peaks[dt] = max(peaks[dt], matmul_peak(device, torch_dt, size))
    for r in rows:
        peak = peaks[r["dtype"]]
        r["fast_peak_fraction"] = r["fast_gflops"] * 1e9 / peak
        r["ref_peak_fraction"] = r["ref_gflops"] * 1e9 / peak
    results = {"conditions": cond, "peaks": peaks, "peak_size": size, "rows": rows}
    if not quick and not args.no_scaling:
        results["scaling"] = scaling(device, 0.5, 3, log)
    if not quick and not args.no_bf16 and not args.no_effect and device.type == "cpu":
        results["bf16_effect"] = bf16_effect(device, 3000)
        log(f"bf16 effect: {results['bf16_effect']}")
    print()
    print(table(rows))
    if results.get("scaling"):
        print(scaling_table(results["scaling"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    if not quick and not args.no_doc:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{device.type}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        if device.type == "cpu":
            gpu_file = RESULTS / "cuda.json"
            gpu = json.loads(gpu_file.read_text()) if gpu_file.exists() else None
            write_doc(results, gpu)
            log(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
