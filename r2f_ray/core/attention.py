"""Expected per-token gradient energy of an attention layer's q, k and v projections, from its forward pass.

The ``activation`` decoder weights each token t of a request by how much gradient its row D_t carries
(``decoders.activation_stats``). For the attention projections that energy follows from the attention
pattern. Write o_s = sum_t P_st v_t with P = softmax(c q_s . k_t) and let the gradient of the head's outputs
dO_s be isotropic and independent across positions (unit variance per coordinate). Then, with
v~_st = v_t - sum_u P_su v_u:

    dL/dv_t = sum_s P_st dO_s                      E|dL/dv_t|^2 = hd sum_s P_st^2
    dL/dk_t = c sum_s P_st <dO_s, v~_st> q_s       E|dL/dk_t|^2 = c^2 sum_s P_st^2 |q_s|^2 |v~_st|^2
    dL/dq_s = c sum_t P_st <dO_s, v~_st> k_t       E|dL/dq_s|^2 = c^2 sum_t,u P_st P_su <v~_st, v~_su> <k_t, k_u>

(q and k after any rotary embedding; a rotation applied before the dot product keeps these norms.) Only the
relative weights across tokens matter to the decoder, so the real gradient's scale is irrelevant. How much
gradient reaches each query position s at all is not isotropic: with a per-position variance sigma_s^2 every
sum over s above is weighted by sigma_s^2 (for q, the whole energy of s is). ``output_query_energy`` models it
from the gradient each token's own prediction sends into the residual stream (``capture.final_norm``), plus a
floor for what reaches s from later tokens' predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The adapted matrices whose gradient energy the attention pattern predicts, and their key in the energies.
ATTENTION_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
# What reaches a position from the predictions of later tokens, relative to the mean output energy of the
# scored tokens. Picked on SmolLM2 (0.1-0.3 equally good on text, 0.3 best on facts; 0 loses 0.08 on q for facts).
OUTPUT_FLOOR = 0.3


def output_query_energy(output_energy: Tensor, scored: Tensor) -> Tensor:
    """sigma_s^2 [T] of the module docstring from a sequence's output energies |dL/dh_s|^2 at the final norm
    (``Capture.output_energy_tokens``) and its scored tokens [T] bool: energy over the scored tokens' mean,
    plus ``OUTPUT_FLOOR``."""
    e = output_energy.double()
    mean = e[scored.to(e.device)].mean() if bool(scored.any()) else e.mean()
    return e / mean.clamp_min(1e-30) + OUTPUT_FLOOR


def attention_gradient_energy(probs: Tensor, queries: Tensor, keys: Tensor, values: Tensor,
                              scale: float, query_energy: Tensor | None = None) -> dict[str, Tensor]:
    """Expected |dL/dq_s|^2, |dL/dk_t|^2, |dL/dv_t|^2 per query head under independent output gradients.

    ``probs`` [H, S, T] are the attention probabilities (rows sum to one), ``queries`` [H, S, hd] and
    ``keys``, ``values`` [H, T, hd] per query head (key/value heads repeated for grouped-query attention),
    ``scale`` the factor c on the scores, ``query_energy`` [S] the variance sigma_s^2 of the output
    gradient at each query position (default 1: isotropic). Returns ``{"q": [H, S], "k": [H, T], "v": [H, T]}``
    in float64.
    """
    p, q, k, v = (t.double() for t in (probs, queries, keys, values))
    sigma = torch.ones_like(p[0, :, 0]) if query_energy is None else query_energy.double().to(p.device)
    hd = v.shape[-1]
    mean_v = p @ v  # [H, S, hd]
    # |v~_st|^2 = |v_t|^2 - 2 <v_t, mean_s> + |mean_s|^2, and <v~_st, v~_su> likewise, without a [H, S, T, hd] tensor.
    vv = v @ v.transpose(-1, -2)  # [H, T, T]
    vm = mean_v @ v.transpose(-1, -2)  # [H, S, T]: <mean_s, v_t>
    mm = mean_v.pow(2).sum(-1)  # [H, S]
    spread = vv.diagonal(dim1=-2, dim2=-1)[:, None, :] - 2 * vm + mm[..., None]  # [H, S, T]
    p2 = p.pow(2) * sigma[:, None]  # P_st^2 sigma_s^2
    energy_k = scale**2 * (p2 * q.pow(2).sum(-1)[..., None] * spread).sum(1)
    energy_v = hd * p2.sum(1)
    # sum_t,u P_st P_su <v~_st, v~_su> <k_t, k_u>, with <v~_st, v~_su> = vv_tu - vm_st - vm_su + mm_s.
    kk = k @ k.transpose(-1, -2)  # [H, T, T]
    pk = p @ kk  # [H, S, T]: sum_t P_st <k_t, k_u>
    term_vv = ((p @ (vv * kk)) * p).sum(-1)
    term_vm = ((p * vm) @ kk * p).sum(-1)
    term_mm = mm * (pk * p).sum(-1)
    energy_q = scale**2 * (term_vv - 2 * term_vm + term_mm) * sigma
    return {"q": energy_q, "k": energy_k, "v": energy_v}


def per_kv_head(energy: Tensor, kv_heads: int) -> Tensor:
    """Sum a [H, T] energy over the query heads that share each key/value head: [kv_heads, T]. The heads'
    output gradients are independent, so their contributions to the shared k or v rows add."""
    heads, tokens = energy.shape
    return energy.view(kv_heads, heads // kv_heads, tokens).sum(1)


def attention_tensors(module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                      keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Recompute one sequence's attention probabilities and per-head q, k, v in a Llama-family attention
    ``module`` (q/k/v projections, optional q/k norms, rotary embedding, causal softmax) from its input
    ``hidden_states`` [T, d], ``position_embeddings`` (cos, sin) [T, hd] and the real tokens ``keep`` [T] bool.

    Returns probs [H, T', T'], q, k, v [H, T', hd] over the kept tokens (k and v repeated per query head).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hd = module.head_dim
    with torch.no_grad():
        h = hidden_states[None]
        q, k, v = (proj(h).view(1, h.shape[1], -1, hd).transpose(1, 2) for proj in (module.q_proj, module.k_proj, module.v_proj))
        if getattr(module, "q_norm", None) is not None:  # Gemma 3 / Qwen 3 normalise q and k per head
            q, k = module.q_norm(q), module.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
        q, k, v = (t[0][:, keep] for t in (q, k, v))
        groups = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        scores = (q @ k.transpose(-1, -2)).double() * module.scaling
        n = scores.shape[-1]
        pos = torch.arange(n, device=scores.device)
        allowed = pos[None, :] <= pos[:, None]
        window = getattr(module, "sliding_window", None)
        if window:
            allowed &= pos[:, None] - pos[None, :] < window
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return probs, q.double(), k.double(), v.double()


def attention_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """{module name: attention module} owning the q, k or v projections among the matrix ``names``."""
    out = {}
    for name in names:
        parent, role = name.rsplit(".", 1)
        if role in ATTENTION_ROLES and parent not in out:
            module = model.get_submodule(parent)
            missing = [a for a in ("q_proj", "k_proj", "v_proj", "head_dim", "scaling") if not hasattr(module, a)]
            if missing:
                raise ValueError(f"{parent} ({type(module).__name__}) lacks {missing}: attention token features "
                                 "support Llama-family attention (Llama, Gemma 3, Qwen, Mistral layouts) only")
            out[parent] = module
    return out


class AttentionRecorder:
    """Context manager that records each chosen attention module's input hidden states and rotary
    embeddings during a forward pass, so ``attention_tensors`` can recompute its attention afterwards.
    With no modules it records nothing (and ``energies`` is empty)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.inputs: dict[str, tuple[Tensor, tuple[Tensor, Tensor]]] = {}
        self._handles = []

    def __enter__(self) -> "AttentionRecorder":
        for name, module in self.modules.items():
            def hook(mod, args, kwargs, name=name):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                self.inputs[name] = (hidden.detach(), tuple(t.detach() for t in kwargs["position_embeddings"]))
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def tensors(self, name: str, example: int, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``attention_tensors`` of module ``name`` for one example of the recorded batch."""
        hidden, (cos, sin) = self.inputs[name]
        return attention_tensors(self.modules[name], hidden[example], (cos[example % cos.shape[0]], sin[example % sin.shape[0]]), keep)

    def energies(self, example: int, keep: Tensor, names: list[str], query_energy: Tensor | None = None) -> dict[str, Tensor]:
        """{matrix name: expected gradient energy [H, T'] per head of its output} for the q, k, v matrices
        among ``names`` whose attention was recorded (H: query heads for q, key/value heads for k and v),
        with ``query_energy`` [T'] the output-gradient variance per position (``output_query_energy``;
        default isotropic)."""
        out, per_module = {}, {}
        for name in names:
            parent, role = name.rsplit(".", 1)
            if role not in ATTENTION_ROLES or parent not in self.inputs:
                continue
            module = self.modules[parent]
            if parent not in per_module:
                probs, q, k, v = self.tensors(parent, example, keep)
                per_module[parent] = attention_gradient_energy(probs, q, k, v, module.scaling, query_energy)
            energy = per_module[parent][ATTENTION_ROLES[role]]
            out[name] = energy if role == "q_proj" else per_kv_head(energy, module.k_proj.out_features // module.head_dim)
        return out
