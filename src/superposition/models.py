"""The toy-model family, instance-batched: every parameter carries the instance dimension first.

| kind          | forward (per instance)                                   | parameters                      |
| ------------- | -------------------------------------------------------- | ------------------------------- |
| linear        | x' = W^T W x + b                                         | W (or W1, W2), b_final          |
| relu-output   | x' = ReLU(W^T W x + b)                                   | W (or W1, W2), b_final          |
| neuron        | x' = ReLU(W^T act(W x + b_h) + b)                        | W (or W1, W2), b_hidden, b_final|
| mlp           | x' = ReLU(W2 act(W1 x + b_h) + b)                        | W1, W2 (or W), b_hidden, b_final|
| residual-mlp  | r = x W_E; r = r + W_out act(W_in r + b_in) + b_out ...; x' = r W_E^T | W_E (frozen), W_in, W_out |

``neuron`` and ``mlp`` share one forward; they differ in defaults (tied vs untied) and in the task they are used for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from superposition.spec import Experiment

__all__ = ["ToyModel", "build_model", "ACTIVATIONS", "Transplant", "transplant"]

ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "none": lambda t: t,
}


def _instance_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _xavier_normal(shape: tuple[int, ...], seeds: list[int], notebook: bool) -> Tensor:
    """Xavier-normal init of (inst, rows, cols), fans per instance (or over the whole tensor, as torch would)."""
    inst, rows, cols = shape[0], shape[-2], shape[-1]
    std = math.sqrt(2.0 / (rows * cols + inst * cols)) if notebook else math.sqrt(2.0 / (rows + cols))
    return torch.stack([torch.randn(shape[1:], generator=_instance_generator(s)) for s in seeds]) * std


def _kaiming_uniform(shape: tuple[int, ...], seeds: list[int], notebook: bool, salt: int, a: float = 0.0) -> Tensor:
    """torch's kaiming_uniform_ with negative slope ``a``: U(±sqrt(6 / ((1 + a²) fan_in))), fans per instance.

    ``a = 0`` is ``nn.init.kaiming_uniform_``'s default, which the seed notebooks call on W1 and W2 (bound
    sqrt(6 / fan_in)); ``a = sqrt(5)`` is nn.Linear's default (bound 1 / sqrt(fan_in)). ``notebook`` takes the fan
    over the whole (inst, rows, cols) tensor as torch does there (fan_in = rows * cols).
    """
    fan_in = shape[1] * shape[-1] if notebook else shape[-1]
    bound = math.sqrt(6.0 / ((1.0 + a * a) * fan_in))
    out = [torch.rand(shape[1:], generator=_instance_generator(s * 7919 + salt)) for s in seeds]
    return (torch.stack(out) * 2 - 1) * bound


# The residual MLP's layers keep nn.Linear's default init: the compressed-computation source does not show its own.
LINEAR_SLOPE = math.sqrt(5.0)


class ToyModel(nn.Module):
    """One model holding ``n_instances`` independent toy models of the same shape."""

    def __init__(self, spec: Experiment):
        super().__init__()
        m = spec.model
        self.kind = m.kind
        self.tied = bool(m.tied)
        self.skip = m.skip
        self.n_instances = spec.n_instances
        self.n_features = m.n_features
        self.d_hidden = m.d_hidden
        self.activations = m.activations
        seeds = instance_seeds(spec)
        inst, n, h = self.n_instances, m.n_features, m.d_hidden
        notebook = m.init == "notebook"

        # Output ReLU per instance: lets linear and relu-output instances share one tensor program.
        kinds = spec.instance_values("model.kind")
        relu_out = [k in ("relu-output", "neuron", "mlp") for k in kinds]
        self.register_buffer("relu_out", torch.tensor(relu_out), persistent=False)

        if m.kind == "residual-mlp":
            e, L = int(m.d_embed or n), m.n_layers
            if m.embedding == "identity":
                w_e = torch.eye(n).expand(inst, n, n).clone()
            else:
                g = [torch.randn((n, e), generator=_instance_generator(s * 104729 + 17)) for s in seeds]
                w_e = torch.stack(g)
                w_e = w_e / w_e.norm(dim=-1, keepdim=True)
            self.register_buffer("W_E", w_e)
            self.W_in = nn.Parameter(_kaiming_uniform((inst, L, h, e), seeds, notebook, 1, LINEAR_SLOPE))
            self.W_out = nn.Parameter(_kaiming_uniform((inst, L, e, h), seeds, notebook, 2, LINEAR_SLOPE))
            if m.bias_hidden:
                self.b_in = nn.Parameter(torch.zeros(inst, L, h))
            if m.bias_out:
                self.b_out = nn.Parameter(torch.zeros(inst, L, e))
            return

        if self.tied:
            self.W = nn.Parameter(_xavier_normal((inst, h, n), seeds, notebook))
        else:
            self.W1 = nn.Parameter(_kaiming_uniform((inst, h, n), seeds, notebook, 1))
            self.W2 = nn.Parameter(_kaiming_uniform((inst, n, h), seeds, notebook, 2))
        if m.bias_hidden:
            self.b_hidden = nn.Parameter(torch.zeros(inst, h))
        if m.bias_out:
            self.b_final = nn.Parameter(torch.zeros(inst, n))

    # -- pieces -------------------------------------------------------------------------------------------------
    @property
    def encoder(self) -> Float[Tensor, "inst hidden feats"]:
        """The input-side weights: W (tied) or W1; the residual MLP's first layer read through W_E."""
        if self.kind == "residual-mlp":
            return torch.einsum("ihe,ife->ihf", self.W_in[:, 0], self.W_E)
        return self.W if self.tied else self.W1

    @property
    def decoder(self) -> Float[Tensor, "inst feats hidden"]:
        """The output-side weights: W^T (tied) or W2."""
        if self.kind == "residual-mlp":
            return torch.einsum("ieh,ife->ifh", self.W_out[:, -1], self.W_E)
        return self.W.transpose(-1, -2) if self.tied else self.W2

    def hidden(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst hidden"]:
        """Hidden activations: h = W x for the bottlenecks, neuron activations otherwise (first MLP layer)."""
        return self.hidden_last(x.permute(1, 2, 0)).permute(2, 0, 1)

    def hidden_last(
        self, x: Float[Tensor, "inst feats batch"], mm: Callable[[Tensor, Tensor], Tensor] = torch.matmul
    ) -> Float[Tensor, "inst hidden batch"]:
        """:meth:`hidden` on a feature-major batch (``mm``: the batched product, e.g. the fused engine's)."""
        h = mm(self.encoder, x)
        if self.kind == "residual-mlp":
            if hasattr(self, "b_in"):
                h = h + self.b_in[:, 0, :, None]
            return ACTIVATIONS[self.activations[0]](h)
        if hasattr(self, "b_hidden"):
            h = h + self.b_hidden[..., None]
        if self.kind in ("neuron", "mlp"):
            h = ACTIVATIONS[self.activations[0]](h)
        return h

    def forward(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst feats"]:
        if self.kind == "residual-mlp":
            return self._residual_forward(x)
        h = self.hidden(x)
        out = torch.einsum("bih,ifh->bif", h, self.decoder)
        if hasattr(self, "b_final"):
            out = out + self.b_final
        if self.kind == "linear":
            return out
        if bool(self.relu_out.all()):
            return torch.relu(out)
        return torch.where(self.relu_out[None, :, None], torch.relu(out), out)

    def _residual_forward(self, x: Float[Tensor, "batch inst feats"]) -> Float[Tensor, "batch inst feats"]:
        """r = x W_E; r = r + W_out act(W_in r + b_in) + b_out per layer; x' = r W_E^T, computed without d_embed.

        The residual stream is always a combination coef @ basis of few known rows (W_E's rows, each layer's
        output columns and bias), so every batch-sized product runs in feature/neuron space and only the small
        (rows, d_embed) products touch d_embed: the same function, ~7x faster at d_embed=1000 than r in full.
        """
        coef, basis = x, self.W_E  # (batch, inst, rows), (inst, rows, embed)
        for layer, act in enumerate(self.activations):
            pre = torch.einsum("bik,ikh->bih", coef, torch.einsum("ike,ihe->ikh", basis, self.W_in[:, layer]))
            if hasattr(self, "b_in"):
                pre = pre + self.b_in[:, layer]
            a, rows = ACTIVATIONS[act](pre), self.W_out[:, layer].transpose(-1, -2)
            if hasattr(self, "b_out"):
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                rows = torch.cat([rows, self.b_out[:, layer, None, :]], dim=1)
            if self.skip:
                coef, basis = torch.cat([coef, a], dim=-1), torch.cat([basis, rows], dim=1)
            else:
                coef, basis = a, rows
        return torch.einsum("bik,ikf->bif", coef, torch.einsum("ike,ife->ikf", basis, self.W_E))


def instance_seeds(spec: Experiment) -> list[int]:
    """Initialisation seed of each instance: the seed axis value if given, else base seed and instance index.

    An instance's init depends only on its own seed, never on how many instances share the tensor.
    """
    if "seed" in spec.instances.axes:
        return [int(s) for s in spec.instance_values("seed")]
    return [spec.seed * 100_003 + i for i in range(spec.n_instances)]


def build_model(spec: Experiment, device: torch.device | str = "cpu") -> ToyModel:
    """Build the model of an experiment from its spec alone, on the device. Parameters are always float32 (the
    master weights); ``spec.dtype = "bfloat16"`` only changes the dtype the training step computes in."""
    return ToyModel(spec).to(device=device)


class Transplant(NamedTuple):
    """A plain MLP that holds an embedded residual MLP's weights: its spec and its model."""

    spec: Experiment
    model: ToyModel


@torch.no_grad()
def transplant(model: ToyModel, spec: Experiment, skip: bool | None = None) -> Transplant:
    """Move a one-layer embedded residual MLP into a plain one (identity embedding), as seed 004 does.

    W_in' = W_in W_Eᵀ (hidden, feats), W_out' = W_E W_out (feats, hidden), b_out' = W_E b_out; b_in is kept. With
    ``skip`` False on both sides this is an exact reparametrisation (the same function of x). With a skip connection
    the embedded residual carries x W_E W_Eᵀ where the plain one carries x, so the two differ by x (W_E W_Eᵀ - I).
    ``skip`` (default: the source model's) sets the plain model's skip connection.
    """
    from superposition.spec import SpecError, parse_spec

    m = spec.model
    if m.kind != "residual-mlp" or m.n_layers != 1:
        raise SpecError(f"transplant: needs a one-layer residual-mlp (got {m.kind} with {m.n_layers} layer(s))")
    raw = spec.model_dump(mode="json")
    raw["model"].update(embedding="identity", d_embed=m.n_features, skip=m.skip if skip is None else skip)
    plain_spec = parse_spec(raw)
    p = next(model.parameters())
    plain = build_model(plain_spec, p.device).to(p.dtype)
    w_e = model.W_E
    plain.W_in.copy_(torch.einsum("ihe,ife->ihf", model.W_in[:, 0], w_e).unsqueeze(1))
    plain.W_out.copy_(torch.einsum("ife,ieh->ifh", w_e, model.W_out[:, 0]).unsqueeze(1))
    if hasattr(model, "b_in"):
        plain.b_in.copy_(model.b_in)
    if hasattr(model, "b_out"):
        plain.b_out.copy_(torch.einsum("ife,ie->if", w_e, model.b_out[:, 0]).unsqueeze(1))
    return Transplant(plain_spec, plain)
