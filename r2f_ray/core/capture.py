"""Exact per-example full gradients of linear layers, captured as factors in one backward pass.

For a linear layer ``y = x W^T`` the gradient of the loss over the tokens of one example is
``G = sum_t d_t x_t^T = D^T X``, with X (tokens x d_in) the layer's inputs and D (tokens x d_out) the
gradients at its outputs. Forward hooks keep a reference to X (autograd keeps it alive anyway: no
copy), and ``torch.autograd.grad`` on the layer outputs returns D without ever materialising
``weight.grad``. Because each example's loss depends only on its own tokens, the per-example slices
of X and D give each example's own gradient exactly, from one batched pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r2f_ray.core.targets import MatrixInfo, find_module, resolve_targets

IGNORE_INDEX = -100


def example_nll(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Per-example NLL of the labelled tokens (labels aligned with input ids, shifted here), shape [B].

    ``reduction="mean"`` averages over each example's labelled tokens (the loss of that example
    alone); ``"sum"`` adds them.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    nll = F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none") * valid
    total = nll.sum(dim=1)
    return total / valid.sum(dim=1).clamp_min(1) if reduction == "mean" else total


def scored_positions(labels: Tensor) -> Tensor:
    """Positions whose next-token prediction is in the loss, [B, T] bool (position t predicts label t+1)."""
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return scored


def supervised_token_mask(attention_mask: Tensor, labels: Tensor) -> Tensor:
    """Tokens whose layer inputs and output-gradients can be non-zero, [B, T] bool.

    Padding is excluded (its outputs reach no loss under the attention mask), and so is every position
    after the last one that predicts a labelled token (under causal attention they reach no loss).
    """
    predicts_label = scored_positions(labels)
    if not bool(predicts_label.any(dim=1).all()):
        empty = (~predicts_label.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"examples {empty} have no labelled tokens: every label is -100 (answer empty or truncated away)")
    positions = torch.arange(labels.shape[1], device=labels.device)
    last = torch.where(predicts_label, positions, -1).max(dim=1).values
    return attention_mask.bool() & (positions[None, :] <= last[:, None])


@dataclass
class Capture:
    """Factors of the per-example full gradients of the captured matrices.

    ``inputs[name]`` is X for the whole batch, [B, T, d_in]; modules that read the same tensor (q, k, v;
    gate, up) share one object, so it is held once. ``output_grads[name]`` is D, [B, T, d_out].
    ``token_mask`` selects the tokens that carry gradient; ``loss`` is the per-example loss [B];
    ``scored`` marks the positions whose prediction is in the loss [B, T] (``scored_positions``).
    ``extra_grads`` holds gradients of any extra parameters asked for (e.g. LoRA adapters).
    ``output_energy`` [B, T] (when asked for) is |dL/dh_t|^2 at the input of the model's final norm: the
    gradient each token's own prediction sends into the residual stream (``final_norm``).
    """

    matrices: list[MatrixInfo]
    inputs: dict[str, Tensor]
    output_grads: dict[str, Tensor]
    token_mask: Tensor
    loss: Tensor
    scored: Tensor
    extra_grads: dict[str, Tensor] = field(default_factory=dict)
    output_energy: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.token_mask.shape[0]

    def factors(self, name: str, example: int) -> tuple[Tensor, Tensor]:
        """(X, D) of one example, restricted to the tokens that carry gradient: [T_b, d_in], [T_b, d_out]."""
        keep = self.token_mask[example]
        return self.inputs[name][example][keep], self.output_grads[name][example][keep]

    def scored_tokens(self, example: int) -> Tensor:
        """``scored`` of one example over the tokens ``factors`` returns, [T_b] bool."""
        return self.scored[example][self.token_mask[example]]

    def output_energy_tokens(self, example: int) -> Tensor:
        """``output_energy`` of one example over the tokens ``factors`` returns, [T_b]."""
        if self.output_energy is None:
            raise ValueError("this capture has no output energy: capture with output_energy=True")
        return self.output_energy[example][self.token_mask[example]]

    def dense(self, name: str, example: int | None = None) -> Tensor:
        """Dense fp32 gradient G = D^T X of one example, or of the batch (the sum) when example is None."""
        mask = self.token_mask.unsqueeze(-1)
        x, d = self.inputs[name].float(), (self.output_grads[name] * mask).float()
        if example is None:
            return torch.einsum("bto,bti->oi", d, x)
        return d[example].T @ x[example]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head (Llama-family layout: ``model.norm``, also
    under a PEFT wrapper).

    The gradient at its input, token by token, depends only on that token's own prediction: after the last
    layer no operation mixes positions. So it is a forward-only quantity (one local backward through the
    norm and the head), whatever pass computes it."""
    found = [m for name, m in model.named_modules() if name.endswith("model.norm") and ".layers." not in name]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: expected one final norm at model.norm, found {len(found)}; output "
                         "energies support Llama-family causal LMs (Llama, Gemma 3, Qwen, Mistral layouts)")
    return found[0]


def capture_gradients(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    targets: str | list[str] | tuple[str, ...] | None = None,
    extra_params: dict[str, Tensor] | None = None,
    reduction: str = "mean",
    output_energy: bool = False,
) -> Capture:
    """One forward and backward pass; returns per-example gradient factors for the target matrices.

    The loss is the sum over examples of each example's NLL (``reduction`` over its labelled tokens),
    so the batch gradient is the sum of the per-example gradients. ``labels`` default to the input ids
    with padding ignored; set prompt tokens to -100 to restrict the loss to an answer. ``output_energy``
    also returns each token's |dL/dh_t|^2 at the final norm's input (``Capture.output_energy``).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    token_mask = supervised_token_mask(attention_mask, labels)
    matrices = resolve_targets(model, targets)

    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    shared: dict[tuple, Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor):
            if name in outputs:
                raise RuntimeError(f"module {name} ran twice in one forward pass; capture supports one call per module")
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            inputs[name] = shared.setdefault(key, x.detach())
            if not out.requires_grad:
                # Frozen weights and an input that needs no grad: make the output a leaf so that
                # autograd still delivers its gradient, and everything downstream depends on it.
                out = out.detach().requires_grad_(True)
            outputs[name] = out
            return out

        return hook

    handles = [find_module(model, m.name).register_forward_hook(make_hook(m.name)) for m in matrices]
    if output_energy:
        def final_hook(module: nn.Module, args: tuple):
            hidden = args[0] if args[0].requires_grad else args[0].detach().requires_grad_(True)
            outputs["<final>"] = hidden
            return (hidden, *args[1:])

        handles.append(final_norm(model).register_forward_pre_hook(final_hook))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    missing = [m.name for m in matrices if m.name not in outputs]
    if output_energy and "<final>" not in outputs:
        missing.append("final norm")
    if missing:
        raise RuntimeError(f"target modules did not run in the forward pass: {missing[:3]}")

    per_example = example_nll(logits, labels, reduction)
    extra = dict(extra_params or {})
    wrt = [outputs[m.name] for m in matrices] + list(extra.values())
    if output_energy:
        wrt.append(outputs["<final>"])
    grads = torch.autograd.grad(per_example.sum(), wrt, allow_unused=True)
    energy = grads[-1].detach().double().pow(2).sum(-1) if output_energy else None
    output_grads = {}
    for m, g in zip(matrices, grads[: len(matrices)]):
        output_grads[m.name] = g if g is not None else torch.zeros_like(outputs[m.name])
    extra_grads = {}
    for (k, p), g in zip(extra.items(), grads[len(matrices):len(matrices) + len(extra)]):
        extra_grads[k] = g if g is not None else torch.zeros_like(p)
    return Capture(matrices, inputs, output_grads, token_mask, per_example.detach(), scored_positions(labels), extra_grads,
                   energy)
