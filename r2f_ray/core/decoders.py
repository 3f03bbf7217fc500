"""Gradient decoders: from a matrix's LoRA gradient (grad_A, grad_B) to an estimate of its full gradient G.

One decoder per adapted matrix, but decoders of one role and shape are stacked into one module (a
"group") whose parameters carry a leading K axis, so a model with hundreds of adapted matrices decodes
in a handful of batched tensor ops. Shapes inside a group: grad_a [K, N, r, d_in], grad_b
[K, N, d_out, r], G [K, N, d_out, d_in] (K matrices, N examples).

Kinds (``DECODERS``; adding one is a class plus an entry):

- ``naive``: ``grad_B @ A0`` (no parameters; the floor).
- ``linear``: ``grad_B @ R``, R [r, d_in] initialised by a closed-form ridge fit.
- ``mlp``: the linear lift plus a row-wise MLP shared over the rows of grad_B; each row is normalised
  to unit length before the MLP and the output is scaled back by the row's norm, so gradient scales
  that vary by orders of magnitude do not matter.
- ``two_sided``: ``grad_B @ R + L @ grad_A`` (needs the zero-offset init, where grad_A = s B0^T G
  carries the row space of G); rank up to 2r.
- ``activation``: the posterior mean of G given grad_B under a Gaussian prior on the rows of G whose
  covariance mixes the proxy's E[G^T G] (the prior behind the ridge lift) with the request's own input
  activations X^T diag(w) X (rows of G = D^T X lie in the row space of X). The activation statistics come
  from forward passes only; the mixing weight is calibrated per matrix on proxy pairs. Token weights w_t
  estimate each token's gradient energy |D_t|^2 from forward-only features (``token_features``) with
  coefficients fitted per matrix on exact proxy gradients; without them every token counts as is. One
  feature is the gradient each token's own prediction sends into the residual stream (the loss's local
  gradient at the final norm). For q, k and v another is the energy the request's attention pattern
  implies (``core.attention``), per head, and each head's rows of G are then decoded under its own head's
  statistics. Under the zero-offset init the decoded gradient is also made to agree with grad_A = s B0^T G
  (r directions of G's columns) under an output-side prior from the proxy (see ``_output_side``); the
  pairs' mix is still scored on the lift alone. Under that init a request's token weights come from
  grad_A itself (``grad_a_token_energy``), and the residual-stream writers (o_proj, down_proj) are
  decoded jointly with their neighbours in depth (``residual_writer_decode``), whose output gradients
  are nearly the same: ``DecoderBank.decode_request`` does both.
  Needs ``acts``.
- ``sketch``: the two-sided randomized sketch reconstruction. With Y = grad_B = s G A0^T (range
  sketch) and W = grad_A = s B0^T G (co-range sketch), Q = orth(Y) and G ~= Q (s B0^T Q)^+ W, exact
  when rank(G) <= r; a learned ridge keeps the small solve stable and a learned lift ``grad_B @ R``
  (zero init) corrects what the sketch misses. Zero-offset init only.

All math is plain torch: no Ray here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r2f_ray.core.attention import ATTENTION_ROLES, output_query_energy
from r2f_ray.core.lora import LoraSpec, init_factors
from r2f_ray.core.targets import MatrixInfo

_EPS = 1e-30


def group_key(info: MatrixInfo) -> str:
    """Decoders of one role and shape share a group; the key is a valid ModuleDict key (no dots)."""
    return f"{info.role}-{info.d_out}x{info.d_in}"


class RidgeStats:
    """Sufficient statistics of the ridge fit ``min_R sum_n w_n ||grad_B,n R - G_n||^2`` for K matrices.

    Each example is weighted by ``1 / ||G_n||^2`` so every example counts equally (as under the cosine
    loss) however large its gradient is. Statistics add up, so they can be summed across workers.
    ``left`` is the output side's counterpart, sum_n w_n G_n grad_A,n^T (= s M_out B0 with the proxy's
    output-side prior M_out = sum_n w_n G_n G_n^T); zero under the standard init, where grad_A is zero.
    """

    def __init__(self, gram: Tensor, cross: Tensor, count: Tensor, left: Tensor):
        self.gram = gram  # [K, r, r]   sum_n w_n grad_B^T grad_B
        self.cross = cross  # [K, r, d_in] sum_n w_n grad_B^T G
        self.count = count  # [K] examples summed
        self.left = left  # [K, d_out, r] sum_n w_n G grad_A^T

    @classmethod
    def zeros(cls, k: int, r: int, d_in: int, d_out: int, device=None) -> "RidgeStats":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(k, r, r), z(k, r, d_in), z(k), z(k, d_out, r))

    @classmethod
    def from_batch(cls, grad_b: Tensor, full: Tensor, grad_a: Tensor | None = None) -> "RidgeStats":
        # The products run in fp32 (a batch's dense G in fp64 would double its memory); the r-sized
        # results are summed in fp64.
        grad_b, full = grad_b.float(), full.float()
        w = 1.0 / torch.linalg.vector_norm(full, dim=(-2, -1)).double().pow(2).clamp_min(_EPS)  # [K, N]
        scaled = grad_b * w.float().sqrt()[..., None, None]
        gram = torch.einsum("knor,knos->krs", scaled, scaled).double()
        cross = torch.einsum("knor,knoi->kri", scaled * w.float().sqrt()[..., None, None], full).double()
        if grad_a is None:
            left = torch.zeros(full.shape[0], full.shape[2], grad_b.shape[-1], dtype=torch.float64, device=full.device)
        else:
            per_example = torch.einsum("knoi,knri->knor", full, grad_a.float()).double()  # no second copy of G
            left = (per_example * w[..., None, None]).sum(1)
        return cls(gram, cross, torch.full(w.shape[:1], float(w.shape[1]), dtype=torch.float64, device=w.device), left)

    def __add__(self, other: "RidgeStats") -> "RidgeStats":
        return RidgeStats(*(a + b for a, b in zip(self.tensors(), other.tensors())))

    def tensors(self) -> list[Tensor]:
        """The four statistics, e.g. to all-reduce them in place across workers."""
        return [self.gram, self.cross, self.count, self.left]

    def solve(self, ridge: float) -> Tensor:
        """R [K, r, d_in]; ``ridge`` is relative to the mean eigenvalue of the Gram matrix."""
        r = self.gram.shape[-1]
        scale = self.gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(_EPS)  # [K]
        eye = torch.eye(r, dtype=self.gram.dtype, device=self.gram.device)
        return torch.linalg.solve(self.gram + ridge * scale[:, None, None] * eye, self.cross).float()


def activation_stats(x: Tensor, a0: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Forward-only statistics of a matrix's inputs for the ``activation`` decoder.

    ``x`` [..., T, d_in] are the inputs over the tokens that carry gradient (zero rows add nothing),
    ``a0`` [r, d_in] the recorded LoRA init, ``weights`` [..., T] optional per-token weights w_t (see
    ``token_features``; per-head weights [H, T] give per-head statistics [H, ...]). With
    C = X^T diag(w) X / tr(X^T diag(w) X), returns ``(A0 C A0^T [..., r, r], A0 C [..., r, d_in])`` in fp32:
    C itself (d_in x d_in) is never formed.
    """
    x = x.double()
    z = x @ a0.double().transpose(-1, -2)  # [..., T, r]
    w = torch.ones_like(x[..., 0]) if weights is None else weights.double().to(x.device)
    total = (w * x.pow(2).sum(-1)).sum(-1).clamp_min(_EPS)[..., None, None]
    zt = (z * w[..., None]).transpose(-1, -2)
    return (zt @ z / total).float(), (zt @ x / total).float()


def grad_a_token_energy(x: Tensor, grad_a: Tensor, floor: float = 0.05, ridge: float = 1e-6) -> Tensor:
    """Per-token gradient energy read from a request's own grad_A, [T]: the activation prior's token weights
    under the zero-offset LoRA init.

    grad_A = s B0^T G = s (D B0)^T X, so where the request's inputs X [T, d_in] have full row rank (fewer
    distinct tokens than d_in) grad_A determines P = D B0 [T, r] exactly: r projections of each token's
    output gradient d_t. |P_t|^2 estimates |d_t|^2 up to one scale (B0 is random), the energy the
    weights model from forward features alone; tokens that share an input (a chat template's system
    prompt in every view) share it. ``floor`` (a fraction of the mean) keeps every token in the prior;
    ``ridge`` (relative to the mean squared input norm) regularises near-duplicate inputs."""
    x, grad_a = x.double(), grad_a.double().to(x.device)
    gram = x @ x.T
    gram.diagonal().add_(ridge * float(gram.diagonal().mean().clamp_min(_EPS)))
    p = torch.linalg.solve(gram, x @ grad_a.T)  # [T, r]: the least-norm P with P^T X = grad_A
    energy = p.pow(2).sum(-1)
    return energy + floor * energy.mean().clamp_min(_EPS)


# Matrices that add their output to the residual stream, in the order they write within a layer.
RESIDUAL_WRITER_ROLES = ("o_proj", "down_proj")


@dataclass
class WriterRequest:
    """One residual-stream writer (o_proj, down_proj) as a request sees it: its inputs ``x`` [T, d_in] over
    the request's tokens (views concatenated), its LoRA gradient (``grad_a`` [r, d_in], ``grad_b``
    [d_out, r]), its LoRA init (``a0``, ``b0``) and per-token gradient energies ``weights`` [T]."""

    x: Tensor
    grad_a: Tensor
    grad_b: Tensor
    a0: Tensor
    b0: Tensor
    weights: Tensor


def residual_writer_decode(writers: list[WriterRequest], target: int, correlation: float, scaling: float,
                           ridge: float = 1e-6) -> Tensor:
    """G_hat [d_out, d_in] of ``writers[target]`` given every listed writer's grad_B (zero-offset init).

    Writers of the residual stream at neighbouring depths see nearly the same output gradient at each
    token (the residual path carries it through: on SmolLM2 a layer's down_proj and the next layer's o_proj
    agree to cosine 0.96 on average, o_proj and its own layer's down_proj to 0.82; benchmarks/residual_writers.py),
    while each observes it through its own r token mixes Y = X A0^T. So the target's D
    [T, d_out] is decoded from all of them: column by column, D[:, i] of writer a is Gaussian with
    covariance diag(w_a) (``weights``, normalised to mean 1), and writers a, b correlate token by token
    as ``correlation``^|a - b| sqrt(w_a w_b); grad_B_a / s = D_a^T Y_a are exact observations. The
    posterior mean of D_target gives G = D^T X, which is then made to agree with the target's own grad_A
    (the orthogonal correction onto B0's span). With one writer this is the ``activation`` decoder's
    posterior with C = X^T diag(w) X and no proxy prior. ``writers`` are in residual order, on the same
    tokens; ``ridge`` is relative to the mean observation variance."""
    if not 0 <= correlation < 1:
        raise ValueError(f"correlation must be in [0, 1), got {correlation}")
    tokens = {len(w.x) for w in writers}
    if len(tokens) != 1:
        raise ValueError(f"writers must share the request's tokens, got token counts {sorted(tokens)}")
    own = writers[target]
    device = own.x.device
    ys, ws = [], []
    for w in writers:
        ys.append(w.x.double().to(device) @ w.a0.double().to(device).T)  # [T, r]
        weight = w.weights.double().to(device)
        ws.append(weight / weight.mean().clamp_min(_EPS))
    n = len(writers)
    rho = torch.tensor([[correlation ** abs(a - b) for b in range(n)] for a in range(n)], dtype=torch.float64)
    # Observation covariance [n r, n r] and the target's covariance with the observations [T, n r].
    obs = torch.cat([torch.cat([ys[a].T @ ((rho[a, b] * (ws[a] * ws[b]).sqrt())[:, None] * ys[b]) for b in range(n)], 1)
                     for a in range(n)])
    cross = torch.cat([(rho[target, a] * (ws[target] * ws[a]).sqrt())[:, None] * ys[a] for a in range(n)], 1)
    values = torch.cat([w.grad_b.double().to(device).T / scaling for w in writers])  # [n r, d_out]
    obs.diagonal().add_(ridge * float(obs.diagonal().mean().clamp_min(_EPS)))
    d = cross @ torch.linalg.solve(obs, values)  # [T, d_out]
    g = d.T @ own.x.double()
    b0 = own.b0.double().to(device)
    g = g + b0 @ torch.linalg.solve(b0.T @ b0, own.grad_a.double().to(device) / scaling - b0.T @ g)
    return g.float()


# Per-token features of the activation prior's token weights (``token_features``).
TOKEN_FEATURES = ("log_norm", "first", "scored", "log_scored_after", "log_to_first_scored", "log_attention",
                  "log_output")


def token_features(x: Tensor, scored: Tensor, attention: Tensor | None = None, output: Tensor | None = None) -> Tensor:
    """Forward-only features of one sequence's gradient-carrying tokens, in ``TOKEN_FEATURES`` order:
    [T, F], or [H, T, F] with ``attention``.

    ``x`` [T, d_in] are the tokens' inputs to the matrix, ``scored`` [T] bool whether a token's next-token
    prediction is in the loss. Features: log |x_t|^2, first token (the attention sink), scored, log(1 + scored
    tokens from t on), log(1 + distance to the first scored token); for q, k and v the log of each head's
    expected gradient energy from the attention pattern, ``attention`` [H, T]
    (``core.attention.attention_gradient_energy``; zero for other matrices); and the log of the gradient the
    token's own prediction sends into the residual stream, from ``output`` [T] (``Capture.output_energy``,
    relative as in ``core.attention.output_query_energy``; zero when not given). Positions count relative to
    the scored span, never from the start of a chat template, so the weights carry over between templates
    and models.
    """
    x = x.double()
    s = scored.to(torch.float64).to(x.device)
    pos = torch.arange(len(s), dtype=torch.float64, device=x.device)
    after = s.flip(0).cumsum(0).flip(0)
    first = pos[s > 0].min() if bool((s > 0).any()) else pos.new_tensor(float(len(s)))
    log_out = torch.zeros_like(s) if output is None else output_query_energy(output.to(x.device), scored).log()
    shared = torch.stack([x.pow(2).sum(-1).clamp_min(_EPS).log(), (pos == 0).double(), s, torch.log1p(after),
                          torch.log1p((first - pos).clamp_min(0)), torch.zeros_like(s), log_out], dim=-1)
    if attention is None:
        return shared
    e = attention.double().to(x.device)
    # Relative to each head's largest token, floored: a token no query sees has energy 0, not log 0.
    log_e = (e / e.amax(-1, keepdim=True).clamp_min(_EPS)).clamp_min(1e-8).log()
    features = shared.expand(len(e), -1, -1).clone()
    features[..., TOKEN_FEATURES.index("log_attention")] = log_e
    return features


def fit_token_coefficients(features: list[Tensor], energies: list[Tensor], ridge: float = 1e-3) -> Tensor:
    """Coefficients theta [F] of the token weights w_t = exp(theta . phi_t): a least-squares fit of each
    token's log gradient energy log |D_t|^2 on its features ``phi_t``, within each sequence (both sides
    centred per sequence: only relative weights matter). ``features`` [T_i, F] and ``energies`` [T_i] per
    sequence (or per head of a sequence), from exact gradients of a proxy."""
    rows, targets = [], []
    for f, e in zip(features, energies):
        e = e.double()
        y = e.clamp_min(float(e.max()) * 1e-8 + _EPS).log()
        rows.append(f.double() - f.double().mean(0))
        targets.append(y - y.mean())
    f, y = torch.cat(rows), torch.cat(targets)
    eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    return torch.linalg.solve(f.T @ f + ridge * len(f) * eye, f.T @ y).float()


class DecoderGroup(nn.Module):
    """K stacked decoders of one kind for matrices of one role and shape.

    ``forward(grad_a, grad_b, index=None, acts=None, request=False)`` decodes; ``index`` [K'] picks a subset
    of the K members (in that order) so a caller can decode only the matrices it has; ``acts`` are the
    ``activation_stats`` of each (matrix, example), stacked, for kinds that read them; ``request`` says
    they are a request's token-weighted statistics (``DecoderBank.decode``) rather than a pair's.
    """

    kind: str = ""
    needs_grad_a = False  # True: only meaningful for the zero-offset init (grad_A is zero otherwise)
    needs_acts = False  # True: decodes with the input activation statistics of the request
    fits_ridge = False  # True: ``init_ridge`` gives it a closed-form start
    output_side = False  # True: ``output_scores`` calibrates an output-side prior (activation, zero-offset init)
    calibration_grid: tuple[float, ...] = ()  # non-empty: ``calibrate`` picks one value per matrix

    def __init__(self, infos: list[MatrixInfo], spec: LoraSpec, **options):
        super().__init__()
        shapes = {(i.role, i.d_out, i.d_in) for i in infos}
        if len(shapes) != 1:
            raise ValueError(f"a decoder group holds matrices of one role and shape, got {sorted(shapes)}")
        if options:
            raise ValueError(f"decoder kind {self.kind!r} takes no options {sorted(options)}")
        self.names = [i.name for i in infos]
        self.role, self.d_out, self.d_in = infos[0].role, infos[0].d_out, infos[0].d_in
        self.r, self.scaling = spec.r, spec.scaling
        a0, b0 = zip(*(init_factors(spec, i) for i in infos))
        # The LoRA init is a function of (spec, name): recomputed, never stored with the bank.
        self.register_buffer("a0", torch.stack(a0), persistent=False)  # [K, r, d_in]
        self.register_buffer("b0", torch.stack(b0), persistent=False)  # [K, d_out, r]

    def __len__(self) -> int:
        return len(self.names)

    @staticmethod
    def _pick(t: Tensor, index: Tensor | None) -> Tensor:
        # Always compute in fp32 (also under bf16 training): the small solves and QR need it.
        return (t if index is None else t.index_select(0, index)).float()

    def init_ridge(self, stats: RidgeStats, ridge: float) -> None:
        raise NotImplementedError(f"decoder kind {self.kind!r} has no closed-form init")

    def calibration_scores(self, grad_a: Tensor, grad_b: Tensor, full: Tensor, acts) -> Tensor:
        """Sum over the batch of the cosine to G for each grid value, [K, len(calibration_grid)]."""
        raise NotImplementedError(f"decoder kind {self.kind!r} has nothing to calibrate")

    def set_request_calibration(self, choice: Tensor) -> None:
        raise NotImplementedError(f"decoder kind {self.kind!r} has no request mix")

    def set_calibration(self, choice: Tensor) -> None:
        """``choice`` [K]: index into ``calibration_grid`` per matrix."""
        raise NotImplementedError(f"decoder kind {self.kind!r} has nothing to calibrate")

    def forward(self, grad_a: Tensor | None, grad_b: Tensor, index: Tensor | None = None, acts=None,
                request: bool = False) -> Tensor:
        raise NotImplementedError


class NaiveGroup(DecoderGroup):
    kind = "naive"

    def forward(self, grad_a, grad_b, index=None, acts=None, request=False):
        return grad_b.float() @ self._pick(self.a0, index).unsqueeze(1)


class LinearGroup(DecoderGroup):
    kind = "linear"
    fits_ridge = True

    def __init__(self, infos, spec, **options):
        super().__init__(infos, spec, **options)
        # Before any fit, the lift starts at A0 scaled to undo s * A0^T A0 on average (E[A0^T A0] = r/(3 d_in) I).
        self.lift = nn.Parameter(self.a0 * (3.0 * self.d_in / (self.r * self.scaling)))

    def init_ridge(self, stats, ridge):
        with torch.no_grad():
            self.lift.copy_(stats.solve(ridge).to(self.lift))

    def init_covariance(self, cov: Tensor, ridge: float = 1e-3) -> None:
        """Forward-only start from the input covariance C [K, d_in, d_in] of each matrix.

        ``min_R E||s G A0^T R - G||^2`` has ``R = (A0 M A0^T)^-1 A0 M / s`` with M = E[G^T G]; for
        G = D^T X with output gradients roughly isotropic and independent of the inputs, M is
        proportional to C = E[X^T X], which forward passes alone measure (on any model, any shapes).
        """
        a0 = self.a0.double()
        m = cov.double().to(a0.device)
        gram = a0 @ m @ a0.transpose(-1, -2)
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(_EPS)[:, None, None]
        eye = torch.eye(self.r, dtype=gram.dtype, device=gram.device)
        lift = torch.linalg.solve(gram + ridge * scale * eye, a0 @ m) / self.scaling
        with torch.no_grad():
            self.lift.copy_(lift.to(self.lift))

    def forward(self, grad_a, grad_b, index=None, acts=None, request=False):
        return grad_b.float() @ self._pick(self.lift, index).unsqueeze(1)


class MLPGroup(LinearGroup):
    kind = "mlp"

    def __init__(self, infos, spec, hidden: int = 64):
        super().__init__(infos, spec)
        k = len(infos)
        self.w1 = nn.Parameter(torch.randn(k, self.r, hidden) / math.sqrt(self.r))
        self.b1 = nn.Parameter(torch.zeros(k, 1, hidden))
        # Zero output layer: training starts exactly at the (ridge-fitted) linear lift.
        self.w2 = nn.Parameter(torch.zeros(k, hidden, self.d_in))

    def forward(self, grad_a, grad_b, index=None, acts=None, request=False):
        grad_b = grad_b.float()
        k, n, o, r = grad_b.shape
        linear = grad_b @ self._pick(self.lift, index).unsqueeze(1)
        # Scale invariance: scale of grad_B rows is not informative, only their direction is.
        rows = grad_b.reshape(k, n * o, r)
        norm = rows.norm(dim=-1, keepdim=True)
        unit = rows / norm.clamp_min(_EPS)
        hidden = F.gelu(unit @ self._pick(self.w1, index) + self._pick(self.b1, index))
        # A grad_B row has norm ~ s |g| sqrt(r / (3 d_in)) for a G row g: scale the residual back to |g|.
        residual = (hidden @ self._pick(self.w2, index)) * norm * (math.sqrt(3.0 * self.d_in / self.r) / self.scaling)
        return linear + residual.reshape(k, n, o, self.d_in)


class TwoSidedGroup(LinearGroup):
    kind = "two_sided"
    needs_grad_a = True

    def __init__(self, infos, spec, **options):
        super().__init__(infos, spec, **options)
        self.left = nn.Parameter(torch.zeros(len(infos), self.d_out, self.r))

    def forward(self, grad_a, grad_b, index=None, acts=None, request=False):
        return super().forward(grad_a, grad_b, index) + self._pick(self.left, index).unsqueeze(1) @ grad_a.float()


class SketchGroup(DecoderGroup):
    kind = "sketch"
    needs_grad_a = True

    def __init__(self, infos, spec, ridge: float = 1e-3, keep: int | None = None):
        super().__init__(infos, spec)
        k = len(infos)
        # Range directions kept: fewer than r makes the small solve overdetermined (r equations per
        # column for `keep` unknowns), which is far more stable than the square oblique projection.
        self.keep = keep if keep is not None else max(1, spec.r // 2)
        if not 1 <= self.keep <= spec.r:
            raise ValueError(f"sketch keep must be in [1, r={spec.r}], got {self.keep}")
        self.log_ridge = nn.Parameter(torch.full((k, 1, 1, 1), math.log(ridge)))
        self.lift = nn.Parameter(torch.zeros(k, self.r, self.d_in))

    def forward(self, grad_a, grad_b, index=None, acts=None, request=False):
        grad_a, grad_b = grad_a.float(), grad_b.float()
        # Orthonormal basis of the dominant range of the range sketch, [K, N, d_out, keep].
        q = torch.linalg.svd(grad_b, full_matrices=False).U[..., : self.keep]
        m = self.scaling * self._pick(self.b0, index).transpose(-1, -2).unsqueeze(1) @ q  # [K, N, r, keep] = s B0^T Q
        mt = m.transpose(-1, -2)
        gram = mt @ m
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(_EPS)
        eye = torch.eye(self.keep, dtype=gram.dtype, device=gram.device)
        ridge = self._pick(self.log_ridge, index).exp()
        coeff = torch.linalg.solve(gram + ridge * scale * eye, mt @ grad_a)  # [K, N, keep, d_in]
        return q @ coeff + grad_b @ self._pick(self.lift, index).unsqueeze(1)


class ActivationGroup(DecoderGroup):
    kind = "activation"
    needs_acts = True
    fits_ridge = True
    calibration_grid = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
    # Token-weighted request statistics want little of the proxy prior (on SmolLM2, 0.01, the pairs' grid
    # floor, was picked for most matrices), so the request mix is picked on a grid that reaches further down.
    request_grid = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
    # Weight of the identity in the output-side prior (zero-offset init). On SmolLM2 pairs q and k pick 0.03-0.1
    # (their rows are heads, far from isotropic), o and the MLP roles mostly 0.3, v 0.3 or 1.
    output_grid = (0.03, 0.1, 0.3, 1.0)

    def __init__(self, infos, spec, ridge: float = 1e-5, mix: float = 0.5):
        super().__init__(infos, spec)
        if not 0 < mix < 1:
            raise ValueError(f"activation mix must be in (0, 1), got {mix}")
        k = len(infos)
        self.ridge = ridge
        # The proxy prior M = mean_n G_n^T G_n / ||G_n||^2 (trace 1), seen through A0: A0 M A0^T and A0 M.
        # Fixed by the closed form (init_ridge), so they are buffers: saved with the bank, not trained.
        self.register_buffer("prior_gram", torch.zeros(k, self.r, self.r))
        self.register_buffer("prior_cross", torch.zeros(k, self.r, self.d_in))
        self.mix_logit = nn.Parameter(torch.full((k,), math.log(mix / (1 - mix))))
        # Token weights w_t = exp(token_coef . token_features) in the request's X^T diag(w) X; zero = every
        # token as it comes (|x_t|^2). Fitted on exact proxy gradients (``fit_token_coefficients``).
        self.register_buffer("token_coef", torch.zeros(k, len(TOKEN_FEATURES)))
        # The mixing weight for requests' token-weighted statistics, picked when the token weights are fitted
        # (``set_request_calibration``); NaN: requests use the pairs' mix_logit.
        self.register_buffer("request_mix_logit", torch.full((k,), float("nan")))
        # Zero-offset init only: grad_A = s B0^T G sees r directions of G's columns, which the lift from grad_B
        # ignores. Decoding also conditions on them, under an output-side prior M_out = mean_n G_n G_n^T /
        # ||G_n||^2 of the proxy (mean diagonal 1), kept through B0 as M_out B0 and B0^T M_out B0, mixed with
        # the identity by ``out_mix`` (1, the default: the orthogonal projection onto B0's span, which needs
        # no statistics; picked per matrix on the proxy pairs, ``set_output_calibration``; requests use it as is).
        self.output_side = spec.init == "zero_offset"
        self.register_buffer("out_cross", torch.zeros(k, self.d_out, self.r))
        self.register_buffer("out_gram", torch.zeros(k, self.r, self.r))
        self.register_buffer("out_mix", torch.ones(k))

    def token_weights(self, member: int, features: Tensor) -> Tensor:
        """Per-token weights [T] (or [H, T]) of member ``member`` for ``token_features`` [T, F] (or [H, T, F]),
        max weight 1 per head."""
        logits = features.double() @ self.token_coef[member].double().to(features.device)
        return (logits - logits.amax(-1, keepdim=True)).exp()

    def init_covariance(self, cov: Tensor, ridge: float | None = None) -> None:
        """Forward-only prior for a model without pairs: M taken proportional to the input covariance
        C [K, d_in, d_in] (the assumption of ``LinearGroup.init_covariance``), trace-normalised. The
        decode-time ridge is the group's own option, so ``ridge`` (the linear kind's) is not used."""
        a0 = self.a0.double()
        m = cov.double().to(a0.device)
        m = m / m.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(_EPS)[:, None, None]
        with torch.no_grad():
            self.prior_gram.copy_((a0 @ m @ a0.transpose(-1, -2)).to(self.prior_gram))
            self.prior_cross.copy_((a0 @ m).to(self.prior_cross))

    def init_ridge(self, stats, ridge):
        n = stats.count.clamp_min(1)[:, None, None]
        with torch.no_grad():
            self.prior_gram.copy_((stats.gram / (n * self.scaling**2)).to(self.prior_gram))
            self.prior_cross.copy_((stats.cross / (n * self.scaling)).to(self.prior_cross))
            if self.output_side:  # left = s sum_n w_n G G^T B0, each example's G G^T / ||G||^2 of trace 1
                out_cross = stats.left.to(self.b0.device) * (self.d_out / (n * self.scaling))
                self.out_cross.copy_(out_cross.to(self.out_cross))
                self.out_gram.copy_((self.b0.double().transpose(-1, -2) @ out_cross).to(self.out_gram))

    def _lift(self, acts, mix: Tensor, index: Tensor | None) -> Tensor:
        """mix [K], the weight of the proxy prior -> the per-example lift L [K, N, r, d_in], G_hat = grad_B L."""
        if acts is None:
            raise ValueError("decoder kind 'activation' needs the input activation statistics of each request "
                             "(activation_stats of the matrix inputs, from a forward pass); pairs stored as dense "
                             "gradients have none: generate factor pairs, or use another kind")
        # [K, N, r, r], [K, N, r, d_in]; per-head statistics have a head axis after N: [K, N, H, r, ...].
        act_gram, act_cross = (t.double() for t in acts)
        lead = (1,) * (act_gram.dim() - 3)
        beta = mix.double().view(-1, *lead, 1, 1)
        gram = beta * self._pick(self.prior_gram, index).double().view(-1, *lead, self.r, self.r) + (1 - beta) * act_gram
        cross = beta * self._pick(self.prior_cross, index).double().view(-1, *lead, self.r, self.d_in) + (1 - beta) * act_cross
        # Posterior mean of a row g of G given its observation s g A0^T (a row of grad_B) under g ~ N(0, S):
        # g = row (A0 S A0^T)^-1 A0 S / s.
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(_EPS)
        eye = torch.eye(self.r, dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + self.ridge * scale * eye, cross).float() / self.scaling

    def mix(self, index: Tensor | None = None, request: bool = False) -> Tensor:
        """Mixing weight of the proxy prior per member [K'] (the request mix where one was picked)."""
        logit = self._pick(self.mix_logit, index)
        if request:
            picked = self._pick(self.request_mix_logit, index).to(logit)
            logit = torch.where(torch.isnan(picked), logit, picked)
        return torch.sigmoid(logit)

    def forward(self, grad_a, grad_b, index=None, acts=None, request=False):
        lift = self._lift(acts, self.mix(index, request), index)
        if lift.dim() == 4:
            decoded = grad_b.float() @ lift
        else:
            k, n, heads = lift.shape[:3]  # per head: head h's rows of grad_B through its own lift
            rows = grad_b.float().reshape(k, n, heads, -1, self.r)
            decoded = (rows @ lift).reshape(k, n, -1, self.d_in)
        if self.output_side and grad_a is not None:
            decoded = decoded + self._output_side(grad_a, decoded, index)
        return decoded

    def _output_projection(self, index: Tensor | None, out_mix: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(M B0 [K, d_out, r], (B0^T M B0)^-1 [K, r, r]) in fp64 with M = (1 - out_mix) M_out + out_mix I: their
        product P is what ``_output_side`` applies."""
        lam = (self._pick(self.out_mix, index) if out_mix is None else out_mix.float()).double().view(-1, 1, 1)
        b0 = self._pick(self.b0, index).double()
        cross = (1 - lam) * self._pick(self.out_cross, index).double() + lam * b0
        gram = (1 - lam) * self._pick(self.out_gram, index).double() + lam * b0.transpose(-1, -2) @ b0
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(_EPS)
        eye = torch.eye(self.r, dtype=gram.dtype, device=gram.device)
        return cross, torch.linalg.inv(gram + 1e-9 * scale * eye)

    def _output_residual(self, grad_a: Tensor, decoded: Tensor, index: Tensor | None) -> Tensor:
        """B0^T G is observed (grad_A / s): what ``decoded`` gets wrong there, [K, N, r, d_in]."""
        return grad_a.float() / self.scaling - self._pick(self.b0, index).transpose(-1, -2).unsqueeze(1) @ decoded

    def _output_side(self, grad_a: Tensor, decoded: Tensor, index: Tensor | None, out_mix: Tensor | None = None) -> Tensor:
        """What grad_A adds to the lift ``decoded``: P (grad_A / s - B0^T G_hat) with P = M B0 (B0^T M B0)^-1,
        M = (1 - out_mix) M_out + out_mix I. It makes B0^T G_hat equal the observed B0^T G and leaves the rest
        of G_hat as the lift decoded it: the posterior mean under the two priors, when both hold."""
        cross, inv = self._output_projection(index, out_mix)
        return (cross @ inv).float().unsqueeze(1) @ self._output_residual(grad_a, decoded, index)

    @torch.no_grad()
    def output_scores(self, grad_a: Tensor, grad_b: Tensor, full: Tensor, acts) -> Tensor:
        """Summed cosine to G [K, len(output_grid)] of the decoded gradient for each output-side mix (the
        input side as ``forward`` decodes pairs); zero-offset init only. From r-sized products: each grid value
        costs no dense gradient (with C = P^T: <G_hat, G> = <lift, G> + <R, C G>, ||G_hat||^2 = ||lift||^2 +
        2 <C lift, R> + <R, C P R>, R the residual on B0^T G)."""
        if not self.output_side:
            raise ValueError("the output-side prior reads grad_A, which is zero under the standard LoRA init")
        lift = self.forward(None, grad_b, None, acts)
        full = full.float()
        residual = self._output_residual(grad_a, lift, None).double()
        k, n = grad_b.shape[:2]
        sides = torch.stack([self.out_cross.float(), self.b0.float()], dim=1).transpose(-1, -2)  # [K, 2, r, d_out]
        # [K, N, 2, r, d_in]: (M_out B0)^T and B0^T applied to G and to the lift, the products every grid value reuses
        on_full = (sides.reshape(k, 1, 2 * self.r, -1) @ full).view(k, n, 2, self.r, -1).double()
        on_lift = (sides.reshape(k, 1, 2 * self.r, -1) @ lift).view(k, n, 2, self.r, -1).double()
        dot0 = (lift.reshape(k * n, 1, -1) @ full.reshape(k * n, -1, 1)).view(k, n).double()
        lift_sq = torch.linalg.vector_norm(lift, dim=(-2, -1)).double().pow(2)
        full_norm = torch.linalg.vector_norm(full, dim=(-2, -1)).double()
        scores = []
        for value in self.output_grid:
            lam = torch.full((len(self),), value, device=grad_b.device)
            cross, inv = self._output_projection(None, lam)  # M B0, (B0^T M B0)^-1
            w = torch.tensor([1 - value, value], dtype=torch.float64, device=grad_b.device)
            c_full = inv.transpose(-1, -2).unsqueeze(1) @ (w.view(1, 1, 2, 1, 1) * on_full).sum(2)
            c_lift = inv.transpose(-1, -2).unsqueeze(1) @ (w.view(1, 1, 2, 1, 1) * on_lift).sum(2)
            ptp = inv.transpose(-1, -2) @ cross.transpose(-1, -2) @ cross @ inv  # [K, r, r]
            dot = dot0 + (residual * c_full).sum((-2, -1))
            sq = lift_sq + 2 * (residual * c_lift).sum((-2, -1)) + (residual * (ptp.unsqueeze(1) @ residual)).sum((-2, -1))
            scores.append((dot / (sq.clamp_min(0).sqrt() * full_norm).clamp_min(_EPS)).sum(-1))
        return torch.stack(scores, dim=-1)

    def set_output_calibration(self, choice: Tensor) -> None:
        """``choice`` [K]: index into ``output_grid`` of each member's output-side mix."""
        with torch.no_grad():
            self.out_mix.copy_(torch.tensor(self.output_grid, dtype=self.out_mix.dtype)[choice.cpu()].to(self.out_mix))

    @torch.no_grad()
    def calibration_scores(self, grad_a, grad_b, full, acts, grid: tuple[float, ...] | None = None):
        # cos(grad_B L, G) from r-sized statistics, so no grid value materialises a decoded gradient:
        # <grad_B L, G> = <L, grad_B^T G> and ||grad_B L||^2 = <L, (grad_B^T grad_B) L>, summed over heads
        # when the statistics are per head (head h's rows of grad_B and G against head h's lift).
        heads = acts[0].shape[2] if acts[0].dim() == 5 else 1
        k, n = grad_b.shape[:2]
        rows = grad_b.float().reshape(k, n, heads, -1, self.r)
        bt = rows.transpose(-1, -2)
        cross = (bt @ full.float().reshape(k, n, heads, -1, self.d_in)).double()  # [K, N, H, r, d_in]; fp32 product
        gram = (bt @ rows).double()  # [K, N, H, r, r]
        full_norm = torch.linalg.vector_norm(full.float(), dim=(-2, -1)).double()
        scores = []
        for value in grid or self.calibration_grid:
            lift = self._lift(acts, torch.full((len(self),), value, device=grad_b.device), None).double()
            lift = lift.reshape(k, n, heads, self.r, self.d_in)
            dot = (lift * cross).sum(dim=(-3, -2, -1))
            norm = (lift * (gram @ lift)).sum(dim=(-3, -2, -1)).clamp_min(0).sqrt()
            scores.append((dot / (norm * full_norm).clamp_min(_EPS)).sum(-1))
        return torch.stack(scores, dim=-1)

    def set_calibration(self, choice):
        with torch.no_grad():
            self.mix_logit.copy_(self._grid_logit(self.calibration_grid, choice).to(self.mix_logit))

    def set_request_calibration(self, choice: Tensor) -> None:
        """``choice`` [K]: index into ``request_grid`` of each member's mix for request statistics."""
        with torch.no_grad():
            self.request_mix_logit.copy_(self._grid_logit(self.request_grid, choice).to(self.request_mix_logit))

    @staticmethod
    def _grid_logit(grid: tuple[float, ...], choice: Tensor) -> Tensor:
        value = torch.tensor(grid, dtype=torch.float64)[choice.cpu()]
        return torch.log(value / (1 - value))


DECODERS: dict[str, type[DecoderGroup]] = {
    cls.kind: cls for cls in (NaiveGroup, LinearGroup, MLPGroup, TwoSidedGroup, SketchGroup, ActivationGroup)
}


# ---- losses: per (matrix, example) values [K, N]; the training loss is their mean ----

def pair_cosine(pred: Tensor, full: Tensor) -> Tensor:
    """Cosine between predicted and true gradients per (matrix, example), [K, N]."""
    dot = (pred * full).sum(dim=(-2, -1))
    return dot / (pred.norm(dim=(-2, -1)) * full.norm(dim=(-2, -1))).clamp_min(_EPS)


def cosine_loss(pred: Tensor, full: Tensor) -> Tensor:
    return 1.0 - pair_cosine(pred, full)


def mse_loss(pred: Tensor, full: Tensor) -> Tensor:
    """Squared error relative to ||G||^2: the paper's MSE made comparable across matrices and examples
    whose gradient norms differ by orders of magnitude (plain MSE would train only the largest)."""
    return (pred - full).pow(2).sum(dim=(-2, -1)) / full.pow(2).sum(dim=(-2, -1)).clamp_min(_EPS)


def combined_loss(pred: Tensor, full: Tensor) -> Tensor:
    return cosine_loss(pred, full) + mse_loss(pred, full)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cosine": cosine_loss, "mse": mse_loss, "combined": combined_loss,
}


class Stacked(NamedTuple):
    """One group's slice of a batch: K member names and their tensors stacked on a leading K axis."""

    names: list[str]
    grad_a: Tensor
    grad_b: Tensor
    full: Tensor | None  # G [K, N, d_out, d_in] when the batch has it (training, evaluation)
    acts: tuple[Tensor, Tensor] | None  # activation_stats [K, N, r, r], [K, N, r, d_in] when given


class DecoderSet(nn.Module):
    """Every decoder of a model: one ``DecoderGroup`` per (role, shape), kinds chosen per role.

    ``kinds`` is one kind for all roles or ``{role: kind}`` (roles like ``q_proj``; missing roles use
    ``default_kind``). ``options`` are keyword options per kind, e.g. ``{"mlp": {"hidden": 64}}``.
    """

    def __init__(self, matrices: list[MatrixInfo], spec: LoraSpec, kinds: str | dict[str, str] = "linear",
                 options: dict[str, dict] | None = None, default_kind: str = "linear"):
        super().__init__()
        if not matrices:
            raise ValueError("a decoder set needs at least one matrix")
        self.spec = spec
        self.matrices = list(matrices)
        self.kinds = {m.role: (kinds if isinstance(kinds, str) else kinds.get(m.role, default_kind)) for m in matrices}
        options = options or {}
        for role, kind in self.kinds.items():
            if kind not in DECODERS:
                raise ValueError(f"unknown decoder kind {kind!r} for {role}: choose one of {sorted(DECODERS)}")
            if DECODERS[kind].needs_grad_a and spec.init != "zero_offset":
                raise ValueError(f"decoder kind {kind!r} ({role}) reads grad_A, which is zero under the standard LoRA "
                                 "init: use lora.init=zero_offset for the pairs and the bank, or another kind")
        members: dict[str, list[MatrixInfo]] = {}
        for m in self.matrices:
            members.setdefault(group_key(m), []).append(m)
        self.groups = nn.ModuleDict({
            key: DECODERS[self.kinds[infos[0].role]](infos, spec, **options.get(self.kinds[infos[0].role], {}))
            for key, infos in members.items()})
        self.options = options
        # name -> (group key, position in the group)
        self.where = {name: (key, i) for key, g in self.groups.items() for i, name in enumerate(g.names)}

    @property
    def needs_acts(self) -> bool:
        return any(g.needs_acts for g in self.groups.values())

    def stack(self, batch: dict[str, tuple], names: list[str] | None = None) -> dict[str, Stacked]:
        """Group a per-matrix batch {name: (grad_a [N,r,d_in], grad_b [N,d_out,r][, full[, acts]])} into
        stacked tensors per group (``Stacked``); ``full`` and ``acts`` (a pair, see ``activation_stats``)
        may be missing or None."""
        unknown = [n for n in batch if n not in self.where]
        if unknown:
            raise ValueError(f"no decoder for matrices {unknown[:3]} (the bank covers {len(self.where)} matrices, "
                             f"e.g. {self.matrices[0].name!r})")
        out = {}
        for key, group in self.groups.items():
            present = [n for n in group.names if n in batch and (names is None or n in names)]
            if not present:
                continue
            items = [batch[n] for n in present]
            grad_a = torch.stack([it[0] for it in items])
            grad_b = torch.stack([it[1] for it in items])
            full = torch.stack([it[2] for it in items]) if len(items[0]) > 2 and items[0][2] is not None else None
            acts = None
            if len(items[0]) > 3 and items[0][3] is not None:
                acts = (torch.stack([it[3][0] for it in items]), torch.stack([it[3][1] for it in items]))
            out[key] = Stacked(present, grad_a, grad_b, full, acts)
        return out

    def decode_group(self, key: str, part: Stacked, request: bool = False) -> Tensor:
        group = self.groups[key]
        index = None if part.names == group.names else torch.tensor([self.where[n][1] for n in part.names],
                                                                     device=part.grad_b.device)
        return group(part.grad_a, part.grad_b, index, part.acts, request)

    def forward(self, batch: dict[str, tuple], request: bool = False) -> dict[str, Tensor]:
        """{name: (grad_a [N,r,d_in], grad_b [N,d_out,r][, full, acts])} -> {name: G_hat [N,d_out,d_in]} (fp32).
        ``request``: the acts are requests' token-weighted statistics (activation decoders use their request mix)."""
        out = {}
        for key, part in self.stack(batch).items():
            out.update(zip(part.names, self.decode_group(key, part, request).unbind(0)))
        return out

    def losses(self, stacked: dict, loss: str = "cosine") -> tuple[Tensor, dict[str, Tensor]]:
        """Mean training loss over every (matrix, example) and the per-matrix cosines [N] (detached)."""
        fn = LOSSES[loss]
        total, count, cosines = 0.0, 0, {}
        for key, part in stacked.items():
            pred = self.decode_group(key, part)
            per = fn(pred, part.full.float())
            total = total + per.sum()
            count += per.numel()
            cos = pair_cosine(pred.detach(), part.full.float())
            cosines.update(zip(part.names, cos.unbind(0)))
        return total / max(count, 1), cosines

    def init_ridge(self, stats: dict[str, RidgeStats], ridge: float) -> None:
        """Closed-form start for every group that has one, from ridge statistics keyed by group."""
        for key, group in self.groups.items():
            if group.fits_ridge and key in stats:
                group.init_ridge(stats[key], ridge)

    def ridge_stats(self, stacked: dict) -> dict[str, RidgeStats]:
        """Ridge statistics of a stacked batch, per group that fits one (all members must be present)."""
        out = {}
        for key, part in stacked.items():
            if self.groups[key].fits_ridge:
                if part.names != self.groups[key].names:
                    raise ValueError(f"ridge statistics need every matrix of group {key}")
                grad_a = part.grad_a if self.groups[key].output_side else None  # only it reads the output side
                out[key] = RidgeStats.from_batch(part.grad_b, part.full, grad_a)
        return out

    def calibration_scores(self, stacked: dict) -> dict[str, Tensor]:
        """Per group that calibrates: summed cosines per (matrix, grid value) [K, M] of a stacked batch;
        they add up over batches and workers, and ``calibrate`` picks the best value per matrix."""
        return self._scores(stacked, lambda g: bool(g.calibration_grid), lambda g: g.calibration_scores)

    def _scores(self, stacked: dict, wanted, method) -> dict[str, Tensor]:
        out = {}
        for key, part in stacked.items():
            group = self.groups[key]
            if wanted(group):
                if part.names != group.names:
                    raise ValueError(f"calibration needs every matrix of group {key}")
                out[key] = method(group)(part.grad_a, part.grad_b, part.full, part.acts).double()
        return out

    def calibrate(self, scores: dict[str, Tensor], request: bool = False) -> None:
        """Pick each member's grid value with the best summed score [K, grid] (``calibration_scores``); with
        ``request`` the activation decoders' request mix (scores over their ``request_grid``) instead."""
        for key, group_scores in scores.items():
            choice = group_scores.argmax(dim=-1)
            if request:
                self.groups[key].set_request_calibration(choice)
            else:
                self.groups[key].set_calibration(choice)

    def output_scores(self, stacked: dict) -> dict[str, Tensor]:
        """Per group with an output-side prior (activation decoders under the zero-offset init): summed cosines
        per (matrix, output-side mix) [K, M] of a stacked batch, after ``calibrate``; they add up over batches
        and workers, and ``calibrate_output`` picks the best mix per matrix."""
        return self._scores(stacked, lambda g: g.output_side, lambda g: g.output_scores)

    def calibrate_output(self, scores: dict[str, Tensor]) -> None:
        """Pick each member's output-side mix with the best summed score [K, grid] (``output_scores``)."""
        for key, group_scores in scores.items():
            self.groups[key].set_output_calibration(group_scores.argmax(dim=-1))

    @property
    def has_token_weights(self) -> bool:
        """True when some activation decoder has fitted (non-zero) token-weight coefficients."""
        return any(g.needs_acts and bool(g.token_coef.any()) for g in self.groups.values())

    @property
    def attention_weighted(self) -> set[str]:
        """Names of the q, k, v matrices whose token weights use the attention feature (decoded per head)."""
        return {name for name in self.where if self.uses_feature(name, "log_attention")}

    @property
    def output_weighted(self) -> set[str]:
        """Names of the matrices whose token weights use the output-energy feature (their requests need
        ``capture_gradients(..., output_energy=True)``; their attention feature then weights queries by it)."""
        return {name for name in self.where if self.uses_feature(name, "log_output")}

    def uses_feature(self, name: str, feature: str) -> bool:
        """Whether matrix ``name``'s token weights use ``feature`` (a non-zero coefficient; the attention
        feature only for q, k and v)."""
        key, i = self.where[name]
        group = self.groups[key]
        if not group.needs_acts or (feature == "log_attention" and group.role not in ATTENTION_ROLES):
            return False
        return float(group.token_coef[i, TOKEN_FEATURES.index(feature)]) != 0

    def token_weights(self, name: str, features: Tensor) -> Tensor | None:
        """Per-token weights [T] (per head [H, T]) for matrix ``name`` from ``token_features`` [T, F]
        ([H, T, F]); None when its decoder reads no activations."""
        key, i = self.where[name]
        group = self.groups[key]
        return group.token_weights(i, features) if group.needs_acts else None

    def set_token_coefficients(self, coefficients: dict[str, Tensor]) -> None:
        """Set the token-weight coefficients [F] (``fit_token_coefficients``) of activation decoders by name."""
        for name, theta in coefficients.items():
            key, i = self.where[name]
            group = self.groups[key]
            if not group.needs_acts:
                raise ValueError(f"{name} has a {group.kind} decoder, which has no token weights")
            if tuple(theta.shape) != (len(TOKEN_FEATURES),):
                raise ValueError(f"{name}: got {tuple(theta.shape)} token-weight coefficients, expected one per feature "
                                 f"{TOKEN_FEATURES}")
            with torch.no_grad():
                group.token_coef[i].copy_(theta.to(group.token_coef))


def fit_local(decoders: DecoderSet, batches: list[dict], steps: int, lr: float = 1e-3, loss: str = "cosine",
              ridge: float | None = 1e-3) -> list[float]:
    """Train a decoder set in this process (no Ray, no DeepSpeed): ridge init from all batches, then
    ``steps`` Adam steps cycling over the batches. For tests and quick comparisons; returns the losses."""
    stacked = [decoders.stack(b) for b in batches]
    if ridge is not None:
        stats: dict[str, RidgeStats] = {}
        for s in stacked:
            for key, st in decoders.ridge_stats(s).items():
                stats[key] = stats[key] + st if key in stats else st
        decoders.init_ridge(stats, ridge)
        scores: dict[str, Tensor] = {}
        for s in stacked:
            for key, sc in decoders.calibration_scores(s).items():
                scores[key] = scores[key] + sc if key in scores else sc
        decoders.calibrate(scores)
        scores = {}
        for s in stacked:
            for key, sc in decoders.output_scores(s).items():
                scores[key] = scores[key] + sc if key in scores else sc
        decoders.calibrate_output(scores)
    params = [p for p in decoders.parameters() if p.requires_grad]
    history = []
    if not params:
        return history
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        value, _ = decoders.losses(stacked[step % len(stacked)], loss)
        opt.zero_grad()
        value.backward()
        opt.step()
        history.append(float(value.detach()))
    return history


@torch.no_grad()
def baseline_cosines(decoders: DecoderSet, stacked: dict) -> dict[str, tuple[Tensor, Tensor]]:
    """Per matrix, per example: cosine of the naive lift ``grad_B @ A0`` to G, and the rank-r ceiling
    ``||G_r|| / ||G||`` (truncated SVD, Eckart-Young) that no rank-r decoder can beat. {name: ([N], [N])}."""
    out = {}
    for key, (names, _, grad_b, full, _) in stacked.items():
        group = decoders.groups[key]
        index = torch.tensor([decoders.where[n][1] for n in names], device=grad_b.device)
        full = full.float()
        naive = pair_cosine(grad_b.float() @ group.a0.index_select(0, index).unsqueeze(1), full)
        s2 = torch.linalg.svdvals(full).double().pow(2)
        ceiling = (s2[..., : group.r].sum(-1) / s2.sum(-1).clamp_min(_EPS)).sqrt().float()
        out.update(zip(names, zip(naive.unbind(0), ceiling.unbind(0))))
    return out


@torch.no_grad()
def input_covariance(model: nn.Module, names: list[str], input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """E[x x^T] of the inputs of each named linear over the unpadded tokens, [d_in, d_in] fp64: forward passes only."""
    from r2f_ray.core.targets import find_module

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.bool()
    sums: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(module, args, out):
            x = args[0][keep].double()
            sums[name] = sums.get(name, 0) + x.T @ x
        return hook

    handles = [find_module(model, n).register_forward_hook(make_hook(n)) for n in names]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    count = int(keep.sum())
    return {n: sums[n] / count for n in names}
