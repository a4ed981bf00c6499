"""The [sae] table: sparse autoencoders trained on a run's activations."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from superposition.spec.base import MAX_DIM, MAX_STEPS, StrictSection

SaeArchitecture = Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
ResampleMethod = Literal["none", "simple", "loss-weighted"]

# Which [sae] field holds the sparsity setting of each architecture (a list there means several SAEs per instance).
SAE_SPARSITY_FIELD: dict[str, str] = {
    "relu": "l1_coefficient",
    "gated": "l1_coefficient",
    "jumprelu": "l0_coefficient",
    "topk": "k",
    "batchtopk": "batch_k",
}


class SaeSpec(StrictSection):
    """Sparse autoencoders trained on a run's hidden activations, one set per toy-model instance."""

    name: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    """Folder name under RUN/sae/ (default: the architecture; with several architectures NAME-ARCH)."""
    architecture: SaeArchitecture | list[SaeArchitecture] = "relu"
    """relu (L1) | topk | batchtopk | jumprelu (L0) | gated; a list trains one SAE folder per architecture."""
    d_sae: int = Field(5, ge=1, le=MAX_DIM)
    """Number of latents of each SAE."""
    tied: bool = False
    """Tie the encoder to the decoder (W_enc = W_dec^T)."""
    init: Literal["transpose", "independent"] = "transpose"
    """Unit decoder rows with W_enc = W_dec^T, or W_enc, W_dec drawn independently (the curriculum's kaiming)."""
    normalize_decoder: bool | None = None
    """Keep decoder rows at unit norm; default on for the L1-penalised relu and gated, off otherwise."""
    l1_coefficient: float | list[float] = 0.2
    """L1 penalty lambda of relu and gated (a list: one SAE per value)."""
    l0_coefficient: float | list[float] = 0.01
    """L0 penalty lambda of jumprelu (a list: one SAE per value)."""
    k: int | list[int] = 1
    """topk: active latents per sample (a list: one SAE per value)."""
    batch_k: float | list[float] | None = None
    """batchtopk: active latents per sample on average over the batch, fractions allowed (default: k)."""
    threshold: float = Field(0.1, gt=0.0, le=1e6, allow_inf_nan=False)
    """jumprelu: initial threshold theta0 (learned as log theta)."""
    bandwidth: float = Field(0.01, gt=0.0, le=1e6, allow_inf_nan=False)
    """jumprelu: width epsilon of the rectangle kernel of the straight-through threshold gradient."""
    steps: int = Field(10000, ge=1, le=MAX_STEPS)
    """Optimiser steps."""
    batch_size: int = Field(1024, ge=1, le=10_000_000)
    """Activation samples per step (fresh from the run's data distribution)."""
    lr: float = Field(1e-3, gt=0.0, le=10.0, allow_inf_nan=False)
    """Adam learning rate."""
    schedule: Literal["constant", "linear", "cosine", "warmup-cosine"] = "constant"
    """Learning-rate schedule (as train.schedule; warm-up uses 5% of the steps)."""
    resample_method: ResampleMethod | list[ResampleMethod] = "loss-weighted"
    """Dead-latent resampling: none | simple (random direction) | loss-weighted (inputs ~ loss^2); list: one each."""
    resample_every: int = Field(2500, ge=0, le=MAX_STEPS)
    """Resample dead latents every this many steps (0: never)."""
    resample_window: int = Field(500, ge=1, le=MAX_STEPS)
    """A latent is dead when it has not fired in this many steps."""
    resample_duplicates: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    """Also resample a live latent whose decoder row has cosine above this with an earlier live latent's (None: off)."""
    resample_scale: float = Field(0.5, gt=0.0, le=1e6, allow_inf_nan=False)
    """loss-weighted: new encoder column norm as a multiple of the mean alive encoder column norm."""
    dense_threshold: float = Field(0.1, gt=0.0, le=1.0, allow_inf_nan=False)
    """A latent is dense when it fires on more than this fraction of samples."""
    log_every: int = Field(100, ge=1, le=MAX_STEPS)
    """Record loss, L0 and dead-latent counts every this many steps."""
    eval_batch: int = Field(16384, ge=1, le=10_000_000)
    """Fresh samples used for the scores."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Seed of the SAE initialisation and of its data stream."""
    engine: Literal["auto", "fast", "eager"] = "auto"
    """fast: the compiled fused step; eager: plain autograd (the reference); auto: fast where compiling pays back."""

    @model_validator(mode="after")
    def _check(self) -> SaeSpec:
        for key in ("architecture", "resample_method"):
            values = getattr(self, key)
            if isinstance(values, list) and (not values or len(set(values)) != len(values)):
                raise ValueError(f"sae.{key}: give a non-empty list without repeats")
        for key in ("l1_coefficient", "l0_coefficient", "k", "batch_k"):
            values = getattr(self, key)
            if values is None:
                continue
            values = values if isinstance(values, list) else [values]
            if not values:
                raise ValueError(f"sae.{key}: the list is empty")
            positive = key in ("k", "batch_k")
            for v in values:
                if not math.isfinite(v) or v < 0 or (positive and v <= 0):
                    raise ValueError(f"sae.{key}: values must be finite and {'> 0' if positive else '>= 0'} (got {v})")
                if positive and v > self.d_sae:
                    raise ValueError(f"sae.{key}: at most d_sae={self.d_sae} latents can be active (got {v})")
        return self

    @property
    def architectures(self) -> list[str]:
        """The architectures as a list."""
        return list(self.architecture) if isinstance(self.architecture, list) else [self.architecture]

    @property
    def resample_methods(self) -> list[str]:
        """The resampling methods as a list."""
        m = self.resample_method
        return list(m) if isinstance(m, list) else [m]

    def sparsity_values(self, architecture: str) -> list[float]:
        """The sparsity settings (lambda or k) that one architecture sweeps."""
        v = getattr(self, SAE_SPARSITY_FIELD[architecture])
        if v is None:  # batch_k defaults to k
            v = self.k
        return [float(x) for x in (v if isinstance(v, list) else [v])]

    def decoder_normalized(self, architecture: str) -> bool:
        """Whether decoder rows are kept at unit norm for this architecture."""
        if self.normalize_decoder is not None:
            return self.normalize_decoder
        return architecture in ("relu", "gated")

    def folder_name(self, architecture: str) -> str:
        """The SAE folder name of one architecture under RUN/sae/."""
        if self.name is None:
            return architecture
        return self.name if len(self.architectures) == 1 else f"{self.name}-{architecture}"

    def for_architecture(self, architecture: str) -> SaeSpec:
        """This spec restricted to one architecture (what one SAE folder stores)."""
        return self.model_copy(update={"architecture": architecture, "name": self.folder_name(architecture)})
