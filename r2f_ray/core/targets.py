"""Which weight matrices R2F adapts: resolving PEFT-style target names to decoder-layer linears."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# Every linear projection of a Llama-style decoder layer. Roles are the module's last name component.
DEFAULT_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT prefixes module names with these when it wraps a model; canonical names drop them.
_PEFT_PREFIXES = ("base_model.model.",)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class MatrixInfo:
    """One adapted weight matrix (PyTorch convention: weight is d_out x d_in)."""

    name: str  # canonical module name, e.g. "model.layers.5.self_attn.q_proj"
    layer: int
    role: str  # last name component, e.g. "q_proj"
    d_out: int
    d_in: int

    @property
    def short_role(self) -> str:
        """q, k, v, o, gate, up, down."""
        return self.role.removesuffix("_proj")


def canonical_name(name: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear modules inside numbered decoder layers, by canonical name.

    A PEFT LoRA wrapper counts as its base linear; its inner ".base_layer" and ".lora_A/B.<adapter>"
    modules are not targets of their own.
    """
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not _LAYER_RE.search(name) or ".lora_" in name or name.endswith(".base_layer"):
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, nn.Linear):
            found[canonical_name(name)] = base
    return found


def resolve_targets(model: nn.Module, targets: str | list[str] | tuple[str, ...] | None = None) -> list[MatrixInfo]:
    """Resolve target modules the way PEFT does.

    ``targets`` is a list of names matched against the last name component (``["q_proj", "v_proj"]``)
    or the full name's suffix (``["layers.5.self_attn.q_proj"]``), or one string taken as a regular
    expression that must match the full canonical name. ``None`` means every default role.
    Unknown names raise ``ValueError`` listing what the model has.
    """
    linears = _decoder_linears(model)
    if not linears:
        raise ValueError("the model has no linear layers inside numbered decoder layers ('...layers.<i>....')")
    if targets is None:
        targets = [r for r in DEFAULT_ROLES if any(n.endswith("." + r) for n in linears)]
    if isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [n for n in linears if pattern.fullmatch(n)]
        if not chosen:
            raise ValueError(f"target regex {targets!r} matches no decoder-layer linear; e.g. {next(iter(linears))!r}")
    else:
        if not targets:
            raise ValueError("target_modules is empty: name at least one module, e.g. ['q_proj', 'v_proj']")
        chosen = []
        for t in targets:
            hits = [n for n in linears if n == t or n.endswith("." + t)]
            if not hits:
                roles = sorted({n.rsplit(".", 1)[-1] for n in linears})
                raise ValueError(f"unknown target module {t!r}: this model's decoder layers have {roles}")
            chosen.extend(hits)
    infos = []
    def order(n: str) -> tuple:
        role = n.rsplit(".", 1)[-1]
        return int(_LAYER_RE.search(n).group(1)), DEFAULT_ROLES.index(role) if role in DEFAULT_ROLES else 99, n

    for name in sorted(set(chosen), key=order):
        lin = linears[name]
        infos.append(MatrixInfo(name, int(_LAYER_RE.search(name).group(1)), name.rsplit(".", 1)[-1],
                                lin.out_features, lin.in_features))
    return infos


def find_module(model: nn.Module, canonical: str) -> nn.Module:
    """The module with this canonical name, whether or not the model is wrapped by PEFT."""
    modules = dict(model.named_modules())
    for prefix in ("",) + _PEFT_PREFIXES:
        if prefix + canonical in modules:
            return modules[prefix + canonical]
    raise KeyError(f"no module named {canonical!r} in the model")
