"""The LoRA probe: real PEFT LoRA adapters with a recorded, seeded initialisation.

PEFT LoRA computes ``W' = W + s * B A`` with A = ``lora_A.weight`` (r x d_in), B = ``lora_B.weight``
(d_out x r) and s = alpha / r, so ``grad_B = s * G A^T`` and ``grad_A = s * B^T G``. At the standard
init (B = 0) the LoRA gradient is an r-column random sketch of G fixed by A0: a decoder belongs to
one A0, so the init is drawn from a generator seeded by (seed, module name) and recorded in a spec.
The zero-offset init draws B0 too and shifts the base weight by ``-s B0 A0`` so the model computes
what it did before while ``grad_A`` becomes informative (a two-sided sketch).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from r2f_ray.core.capture import Capture, capture_gradients
from r2f_ray.core.targets import DEFAULT_ROLES, MatrixInfo, find_module, resolve_targets

ADAPTER = "default"


class LoraSpec(BaseModel):
    """Everything that fixes the LoRA sketch. Pair datasets and decoder banks record it and refuse to mix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha; the scaling is alpha / r")
    target_modules: tuple[str, ...] = Field(DEFAULT_ROLES, description="PEFT-style target names")
    seed: int = Field(0, ge=0, description="seed of the A0 (and B0) draw")
    init: Literal["standard", "zero_offset"] = "standard"

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def fingerprint(self) -> str:
        """Short stable id of the spec (same spec, same id, on any machine)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _generator(spec: LoraSpec, name: str, which: str) -> torch.Generator:
    # Seeded per module name, not by module order: adding targets never changes another matrix's A0.
    digest = hashlib.sha256(f"r2f-lora:{spec.seed}:{name}:{which}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def init_factors(spec: LoraSpec, info: MatrixInfo) -> tuple[Tensor, Tensor]:
    """(A0 [r, d_in], B0 [d_out, r]) in fp32 on CPU, deterministic in (spec, module name).

    A0 ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), PEFT's default (Kaiming-uniform, a = sqrt(5)). B0 is zero for
    the standard init and ~ U(-1/sqrt(r), 1/sqrt(r)) for the zero-offset one.
    """
    bound_a = 1.0 / math.sqrt(info.d_in)
    a0 = (torch.rand(spec.r, info.d_in, generator=_generator(spec, info.name, "A"), dtype=torch.float64) * 2 - 1) * bound_a
    if spec.init == "standard":
        b0 = torch.zeros(info.d_out, spec.r, dtype=torch.float64)
    else:
        bound_b = 1.0 / math.sqrt(spec.r)
        b0 = (torch.rand(info.d_out, spec.r, generator=_generator(spec, info.name, "B"), dtype=torch.float64) * 2 - 1) * bound_b
    return a0.float(), b0.float()


class LoraProbe:
    """A PEFT-wrapped model with seeded adapters, from which LoRA and full gradients are read.

    ``LoraProbe(model, spec)`` wraps ``model`` in place (PEFT injects adapters into its modules).
    """

    def __init__(self, model: nn.Module, spec: LoraSpec):
        from peft import LoraConfig, get_peft_model

        self.spec = spec
        self.matrices: list[MatrixInfo] = resolve_targets(model, list(spec.target_modules))
        config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
                            target_modules=[m.name for m in self.matrices], init_lora_weights=True)
        self.model = get_peft_model(model, config)
        self.init: dict[str, tuple[Tensor, Tensor]] = {}
        with torch.no_grad():
            for info in self.matrices:
                layer = self.layer(info.name)
                a0, b0 = init_factors(spec, info)
                weight = layer.base_layer.weight
                layer.lora_A[ADAPTER].weight.copy_(a0)
                layer.lora_B[ADAPTER].weight.copy_(b0)
                if spec.init == "zero_offset":
                    weight.copy_((weight.float() - spec.scaling * (b0 @ a0).to(weight.device)).to(weight.dtype))
                self.init[info.name] = (a0, b0)

    def layer(self, name: str) -> nn.Module:
        """PEFT's LoRA wrapper for a canonical matrix name."""
        return find_module(self.model, name)

    def lora_parameters(self) -> dict[str, Tensor]:
        """``{name + '.A': lora_A weight, name + '.B': lora_B weight}`` for every adapted matrix."""
        params = {}
        for info in self.matrices:
            layer = self.layer(info.name)
            params[info.name + ".A"] = layer.lora_A[ADAPTER].weight
            params[info.name + ".B"] = layer.lora_B[ADAPTER].weight
        return params

    def reset(self) -> None:
        """Put every adapter back at its recorded init (after an SGD step, say)."""
        with torch.no_grad():
            for info in self.matrices:
                a0, b0 = self.init[info.name]
                layer = self.layer(info.name)
                layer.lora_A[ADAPTER].weight.copy_(a0)
                layer.lora_B[ADAPTER].weight.copy_(b0)

    def capture(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                reduction: str = "mean", output_energy: bool = False) -> Capture:
        """One real PEFT backward: per-example full-gradient factors of every adapted matrix, plus the
        batch's LoRA gradients in ``extra_grads`` (keys ``<name>.A`` and ``<name>.B``)."""
        return capture_gradients(self.model, input_ids, attention_mask, labels, [m.name for m in self.matrices],
                                 extra_params=self.lora_parameters(), reduction=reduction, output_energy=output_energy)


def lora_grads_from_dense(g: Tensor, a0: Tensor, b0: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """(grad_A, grad_B) = (s B0^T G, s G A0^T) for a dense full gradient G."""
    g = g.float()
    return scaling * b0.T.to(g) @ g, scaling * g @ a0.T.to(g)


def lora_grads_from_factors(x: Tensor, d: Tensor, a0: Tensor, b0: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Same as ``lora_grads_from_dense`` with G = D^T X, without forming G: O(T d r) instead of O(d^2)."""
    x, d = x.float(), d.float()
    return scaling * (d @ b0.to(d)).T @ x, scaling * d.T @ (x @ a0.T.to(x))


def naive_lift(grad_b: Tensor, a0: Tensor) -> Tensor:
    """The reference floor of every decoder: ``grad_B @ A0`` (= s G A0^T A0), rank <= r."""
    return grad_b.float() @ a0.to(grad_b.device).float()
