"""The decoder bank: every gradient decoder of one proxy model and LoRA spec, as one loadable artifact.

On disk a bank is one folder: ``decoders.safetensors`` (the learned parameters) and ``manifest.json``
(the proxy model id and weights hash, the LoRA spec, the matrices, decoder kinds and options, how it
was trained and its held-out metrics). The LoRA init (A0, B0) is recomputed from the spec, never
stored. Loading needs torch and safetensors only, no Ray.

A bank belongs to one LoRA spec (its decoders invert that spec's A0) and one proxy model. Loading it
for another model is refused unless the caller names a transfer mode; a different LoRA spec is always
refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from r2f_ray.config import TransferMode
from r2f_ray.core.attention import AttentionRecorder, attention_modules, output_query_energy
from r2f_ray.core.capture import Capture, capture_gradients
from r2f_ray.core.decoders import (RESIDUAL_WRITER_ROLES, TOKEN_FEATURES, DecoderSet, WriterRequest, activation_stats,
                                   fit_token_coefficients, grad_a_token_energy, input_covariance,
                                   residual_writer_decode, token_features)
from r2f_ray.core.lora import LoraSpec, init_factors, lora_grads_from_factors
from r2f_ray.core.targets import MatrixInfo, resolve_targets
from r2f_ray.io import atomic_dir


@dataclass
class RequestView:
    """One sequence of a request as a matrix's token weights see it (``DecoderBank.request_views``): the
    matrix's inputs ``x`` [T, d_in] over the tokens that carry gradient, ``scored`` [T] bool, the attention
    energy [H, T] of its heads (q, k, v) and the output energy [T] (``Capture.output_energy``); either is
    None where the bank's token weights do not use it."""

    x: Tensor
    scored: Tensor
    attention: Tensor | None = None
    output: Tensor | None = None


FORMAT = "r2f-decoder-bank/1"
MANIFEST = "manifest.json"
WEIGHTS = "decoders.safetensors"
TRANSFER_MODES = get_args(TransferMode)  # see r2f_ray.config.TransferMode


class DecoderBank:
    """Decoders for every adapted matrix of a proxy model under one LoRA spec."""

    def __init__(self, decoders: DecoderSet, model_id: str, weights_sha256: str, info: dict | None = None):
        self.decoders = decoders.eval()
        self.spec: LoraSpec = decoders.spec
        self.matrices: list[MatrixInfo] = decoders.matrices
        self.model_id = model_id
        self.weights_sha256 = weights_sha256
        self.info = dict(info or {})  # training data, config, held-out metrics; free-form JSON
        self.transfer: str | None = None  # set by ``load`` when a transfer mode was used
        # How ``request_stats`` weights a request's tokens: "grad_a" reads each token's gradient energy from
        # the request's own grad_A (zero-offset init only: with B0 = 0 grad_A is zero), "model" predicts it
        # from forward features with the fitted token weights.
        self.request_weighting: str = "grad_a" if self.spec.init == "zero_offset" else "model"
        # ``decode_request``: residual-stream writers (o_proj, down_proj) of an activation decoder, under the
        # zero-offset init, are decoded from this many writers on each side too (0: each from its own
        # gradient), their output gradients correlated writer_correlation^distance. Closed form, no training;
        # 2 and 0.7 were picked on a small grid of SmolLM2 Wikipedia gradients (benchmarks/residual_writers.py).
        self.writer_neighbours: int = 2 if self.spec.init == "zero_offset" else 0
        self.writer_correlation: float = 0.7

    @property
    def kinds(self) -> dict[str, str]:
        """Decoder kind per role."""
        return dict(self.decoders.kinds)

    @property
    def device(self) -> torch.device:
        return self.decoders.groups[next(iter(self.decoders.groups))].a0.device

    def to(self, device: str | torch.device) -> "DecoderBank":
        self.decoders.to(device)
        return self

    @classmethod
    def naive(cls, spec: LoraSpec, matrices: list[MatrixInfo], model_id: str, weights_sha256: str) -> "DecoderBank":
        """``grad_B @ A0`` for every matrix: no training, the reference floor."""
        return cls(DecoderSet(matrices, spec, "naive"), model_id, weights_sha256, {"trained": False})

    @classmethod
    def calibrated(cls, spec: LoraSpec, matrices: list[MatrixInfo], model_id: str, weights_sha256: str,
                   covariances: dict[str, Tensor], ridge: float = 1e-3) -> "DecoderBank":
        """Linear lifts fitted from the model's own input covariances (forward passes only, no pairs):
        see ``LinearGroup.init_covariance``. Works for any model, whatever its shapes."""
        decoders = DecoderSet(matrices, spec, "linear")
        _init_from_covariance(decoders, covariances, ridge)
        return cls(decoders, model_id, weights_sha256, {"trained": False, "calibration": "input covariance"})

    def map_by_role_depth(self, matrices: list[MatrixInfo], spec: LoraSpec, model_id: str, weights_sha256: str,
                          covariances: dict[str, Tensor] | None = None, ridge: float = 1e-3) -> "DecoderBank":
        """Transfer to a model of other shapes (e.g. another family): each target matrix takes the kind
        (and shape-free settings) of the proxy matrix of the same role at the nearest relative depth
        (layer / last layer). ``sketch`` decoders carry over (their learned ridge; the shape-bound lift
        restarts at zero); ``activation`` decoders keep their calibrated mix, with the proxy prior replaced
        by the target's input covariance; ``naive`` stays naive; the shape-bound kinds (linear, mlp,
        two_sided) become linear lifts calibrated on the target's input covariances (``covariances``,
        forward passes only).
        The target spec must equal the bank's in r, alpha, seed and init (its target modules differ)."""
        mine = self.spec.model_dump(exclude={"target_modules"})
        theirs = spec.model_dump(exclude={"target_modules"})
        if mine != theirs:
            raise ValueError(f"role/depth transfer keeps the LoRA settings: bank {mine} vs target {theirs}")
        def depth(m: MatrixInfo, ms: list[MatrixInfo]) -> float:
            last = max(x.layer for x in ms)
            return m.layer / last if last else 0.0
        mapping, kinds = {}, {}
        for m in matrices:
            same_role = [p for p in self.matrices if p.role == m.role]
            if not same_role:
                raise ValueError(f"the bank has no {m.role} decoders to map {m.name} to "
                                 f"(it has {sorted({p.role for p in self.matrices})})")
            source = min(same_role, key=lambda p: abs(depth(p, self.matrices) - depth(m, matrices)))
            mapping[m.name] = source.name
            kind = self.kinds[source.role]
            kinds[m.role] = kind if kind in ("naive", "sketch", "activation") else "linear"
        needs_cov = [m.name for m in matrices if kinds[m.role] in ("linear", "activation")]
        missing = [n for n in needs_cov if covariances is None or n not in covariances]
        if missing:
            raise ValueError(f"mapping {len(missing)} matrices (e.g. {missing[0]!r}) to linear or activation decoders "
                             "needs their input covariances from forward passes on the target: pass "
                             "covariances=input_covariance(...)")
        options = {k: v for k, v in self.decoders.options.items() if k in set(kinds.values())}
        decoders = DecoderSet(matrices, spec, kinds, options)
        with torch.no_grad():
            for key, group in decoders.groups.items():
                if group.kind == "sketch":
                    for i, name in enumerate(group.names):
                        src_key, j = self.decoders.where[mapping[name]]
                        group.log_ridge[i].copy_(self.decoders.groups[src_key].log_ridge[j])
                if group.kind == "activation":
                    for i, name in enumerate(group.names):
                        src_key, j = self.decoders.where[mapping[name]]
                        group.mix_logit[i].copy_(self.decoders.groups[src_key].mix_logit[j])
                        group.token_coef[i].copy_(self.decoders.groups[src_key].token_coef[j])
                        group.request_mix_logit[i].copy_(self.decoders.groups[src_key].request_mix_logit[j])
        _init_from_covariance(decoders, {n: covariances[n] for n in needs_cov} if needs_cov else {}, ridge)
        info = {"trained": False, "transfer": {"mode": "by_role_depth", "from_model": self.model_id,
                                               "from_weights_sha256": self.weights_sha256, "mapping": mapping}}
        if decoders.has_token_weights:  # carried over with the activation decoders
            info["token_weights"] = self.info.get("token_weights", "carried over from the bank")
        return DecoderBank(decoders, model_id, weights_sha256, info)

    @property
    def needs_acts(self) -> bool:
        """True when some decoder reads the request's input activation statistics (``decode(..., acts=)``)."""
        return self.decoders.needs_acts

    @property
    def needs_output_energy(self) -> bool:
        """True when the token weights use the output-energy feature: capture requests with
        ``capture_gradients(..., output_energy=True)``; their attention energies then weight each query by it."""
        return bool(self.decoders.output_weighted)

    def request_stats(self, name: str, views: list[RequestView], grad_a: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``activation_stats`` of one request's inputs to matrix ``name`` over its views (``request_views``),
        every token weighted by the matrix's token weights (as it comes where none were fitted); per head
        [H, ...] when the matrix's weights use the attention feature. With the request's (view-mean) grad_A
        and ``request_weighting`` "grad_a", the weights are the energies it reveals (``grad_a_token_energy``),
        shared by the heads."""
        key, i = self.decoders.where[name]
        a0 = self.decoders.groups[key].a0[i]
        per_head = self.decoders.uses_feature(name, "log_attention")
        if per_head and any(v.attention is None for v in views):
            raise ValueError(f"{name}: its token weights use the attention feature; pass each view's attention "
                             "energy (record the forward pass with DecoderBank.attention_recorder)")
        if self.decoders.uses_feature(name, "log_output") and any(v.output is None for v in views):
            raise ValueError(f"{name}: its token weights use the output-energy feature; capture the request with "
                             "capture_gradients(..., output_energy=True)")
        features = torch.cat([token_features(v.x, v.scored, v.attention if per_head else None, v.output)
                              for v in views], dim=-2).to(a0.device)
        x = torch.cat([v.x for v in views]).to(a0.device)
        weights = self.decoders.token_weights(name, features)
        if weights is not None and grad_a is not None and self.request_weighting == "grad_a":
            weights = grad_a_token_energy(x, grad_a).to(a0.device).expand_as(weights)
        return activation_stats(x, a0, weights)

    def decode_request(self, lora_grads: dict[str, tuple[Tensor, Tensor]],
                       views: dict[str, list[RequestView]]) -> dict[str, Tensor]:
        """Decode one request as the engine does: {name: (grad_A, grad_B)} (view means) and {name: the
        request's ``RequestView`` per view} -> {name: G_hat}. Activation decoders read ``request_stats``;
        with ``writer_neighbours`` the residual-stream writers are decoded with their neighbours
        (``residual_writer_decode``) instead."""
        writers = self._residual_writers(lora_grads, views)
        rest = {n: g for n, g in lora_grads.items() if n not in writers}
        acts = {n: self.request_stats(n, views[n], rest[n][0]) for n in rest if n in views}
        decoded = self.decode(rest, acts=acts) if rest else {}
        if writers:
            decoded.update(self._decode_writers(lora_grads, views, writers))
        return {n: decoded[n] for n in lora_grads}

    def _residual_writers(self, lora_grads, views) -> list[str]:
        """The request's residual-stream writers that ``decode_request`` decodes jointly, in residual order."""
        if not self.writer_neighbours or self.spec.init != "zero_offset":
            return []
        infos = {m.name: m for m in self.matrices}
        names = [n for n in lora_grads if n in views and infos[n].role in RESIDUAL_WRITER_ROLES
                 and self.decoders.groups[self.decoders.where[n][0]].needs_acts]
        return sorted(names, key=lambda n: (infos[n].layer, RESIDUAL_WRITER_ROLES.index(infos[n].role)))

    def _decode_writers(self, lora_grads, views, writers: list[str]) -> dict[str, Tensor]:
        requests = []
        for n in writers:
            key, i = self.decoders.where[n]
            group = self.decoders.groups[key]
            a0, b0 = group.a0[i], group.b0[i]
            x = torch.cat([v.x for v in views[n]]).to(a0.device)
            grad_a, grad_b = (t.to(a0.device) for t in lora_grads[n])
            requests.append(WriterRequest(x, grad_a, grad_b, a0, b0, grad_a_token_energy(x, grad_a)))
        k = self.writer_neighbours
        out = {}
        for i, n in enumerate(writers):
            lo = max(0, i - k)
            out[n] = residual_writer_decode(requests[lo:i + k + 1], i - lo, self.writer_correlation, self.spec.scaling)
        return out

    def attention_recorder(self, model: torch.nn.Module) -> AttentionRecorder:
        """Records the attention ``request_stats`` needs during a forward pass of ``model`` (the bank's
        target); records nothing when no decoder's token weights use the attention feature."""
        return AttentionRecorder(attention_modules(model, sorted(self.decoders.attention_weighted)))

    def request_views(self, cap: Capture, recorder: AttentionRecorder, example: int, names: list[str]) -> dict[str, RequestView]:
        """{name: ``RequestView``} of one example of a capture made under ``attention_recorder`` (with
        ``output_energy=needs_output_energy``)."""
        return _views(cap, recorder, example, names, self.needs_output_energy)

    def fit_token_weights(self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                          data: str, batch_size: int = 8, ridge: float = 1e-3, progress: bool = False) -> dict[str, Tensor]:
        """Fit the token weights of every activation decoder on exact gradients of ``model`` (the bank's
        proxy) over labelled sequences, e.g. question/answer chats with the loss on the answer, the form
        of forget requests. ``data`` says what they are, for the manifest. Every weight includes the output
        energy; q, k and v weights the attention feature too (its queries weighted by the output energy),
        fitted per head on each head's share of |D_t|^2. Returns the coefficients."""
        names = [m.name for m in self.matrices if self.decoders.groups[self.decoders.where[m.name][0]].needs_acts]
        if not names:
            raise ValueError(f"the bank has no activation decoders (kinds {self.kinds}): token weights do not apply")
        device = next(model.parameters()).device
        features: dict[str, list[Tensor]] = {n: [] for n in names}
        energies: dict[str, list[Tensor]] = {n: [] for n in names}
        for start in tqdm(range(0, len(input_ids), batch_size), desc="token weights: fit", disable=not progress):
            part = slice(start, start + batch_size)
            with AttentionRecorder(attention_modules(model, names)) as recorder:
                cap = capture_gradients(model, input_ids[part].to(device), attention_mask[part].to(device),
                                        labels[part].to(device), targets=names, output_energy=True)
            for b in range(cap.batch_size):
                views = _views(cap, recorder, b, names, output=True)
                for n, view in views.items():
                    energy = cap.factors(n, b)[1].double().pow(2)
                    phi = token_features(view.x, view.scored, view.attention, view.output).cpu()
                    if view.attention is not None:  # one sequence per head: its rows of D against its own attention energy
                        per_head = energy.view(len(energy), view.attention.shape[0], -1).sum(-1).T
                        features[n].extend(phi.unbind(0))
                        energies[n].extend(per_head.cpu().unbind(0))
                    else:
                        features[n].append(phi)
                        energies[n].append(energy.sum(-1).cpu())
        coefficients = {n: fit_token_coefficients(features[n], energies[n], ridge) for n in names}
        self.decoders.set_token_coefficients(coefficients)
        self._calibrate_requests(model, input_ids, attention_mask, labels, batch_size, progress)
        self.info["token_weights"] = {"data": data, "sequences": len(input_ids), "features": list(TOKEN_FEATURES),
                                      "matrices": len(names), "ridge": ridge, "request_mix": "picked on these sequences"}
        return coefficients

    def _calibrate_requests(self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                            batch_size: int, progress: bool = False) -> None:
        """Pick each activation decoder's mixing weight for the statistics requests are decoded with (token
        weighted, per head): the grid value with the best summed cosine to the exact gradients of the given
        sequences. Kept apart from the pairs' mix (training calibrates that on unweighted pair statistics,
        which want more of the proxy prior), so pair evaluation still decodes the bank as trained."""
        device = next(model.parameters()).device
        groups = {key: g for key, g in self.decoders.groups.items() if g.needs_acts}
        names = [n for g in groups.values() for n in g.names]
        totals: dict[str, Tensor] = {}
        for start in tqdm(range(0, len(input_ids), batch_size), desc="token weights: request mix", disable=not progress):
            part = slice(start, start + batch_size)
            with self.attention_recorder(model) as recorder:
                cap = capture_gradients(model, input_ids[part].to(device), attention_mask[part].to(device),
                                        labels[part].to(device), targets=names, output_energy=self.needs_output_energy)
            views = [self.request_views(cap, recorder, b, names) for b in range(cap.batch_size)]
            for key, group in groups.items():  # one group at a time: its dense gradients only
                totals[key] = totals.get(key, 0) + self._request_scores(group, cap, views)
        self.decoders.calibrate(totals, request=True)

    @torch.no_grad()
    def _request_scores(self, group, cap, views: list[dict[str, RequestView]]) -> Tensor:
        """``calibration_scores`` [K, grid] of one activation group on a capture's examples as requests."""
        infos = {m.name: m for m in self.matrices}
        grad_b, full, gram, cross = [], [], [], []
        for name in group.names:
            a0, b0 = (t.to(group.a0.device) for t in init_factors(self.spec, infos[name]))
            per_example = []
            for b in range(cap.batch_size):
                x, d = (t.to(a0.device).float() for t in cap.factors(name, b))
                ga, gb = lora_grads_from_factors(x, d, a0, b0, self.spec.scaling)
                stats = self.request_stats(name, [views[b][name]], ga)
                per_example.append((gb, d.T @ x, *stats))
            for out, column in zip((grad_b, full, gram, cross), zip(*per_example)):
                out.append(torch.stack(column))
        stacked = [torch.stack(t) for t in (grad_b, full, gram, cross)]  # [K, N, ...]
        return group.calibration_scores(None, stacked[0], stacked[1], (stacked[2], stacked[3]), group.request_grid).double()

    @torch.no_grad()
    def decode(self, lora_grads: dict[str, tuple[Tensor, Tensor]],
               acts: dict[str, tuple[Tensor, Tensor]] | None = None, request: bool = True) -> dict[str, Tensor]:
        """{name: (grad_A [r, d_in], grad_B [d_out, r])} -> {name: G_hat [d_out, d_in]} (fp32), batched per group.

        ``acts`` {name: statistics of the matrix's inputs over the request's tokens, ``request_stats``}:
        needed by the ``activation`` kind (see ``needs_acts``), ignored by the others. ``request=False``
        decodes unweighted ``activation_stats`` with the mix calibrated on pairs (the bank as trained)."""
        device = self.device
        batch = {}
        for name, (grad_a, grad_b) in lora_grads.items():
            stats = None
            if acts is not None and name in acts:
                stats = tuple(t.to(device, torch.float32).unsqueeze(0) for t in acts[name])
            batch[name] = (grad_a.to(device, torch.float32).unsqueeze(0), grad_b.to(device, torch.float32).unsqueeze(0),
                           None, stats)
        self._check_shapes(batch)
        return {name: g.squeeze(0) for name, g in self.decoders(batch, request=request).items()}

    def _check_shapes(self, batch: dict[str, tuple[Tensor, Tensor]]) -> None:
        by_name = {m.name: m for m in self.matrices}
        r = self.spec.r
        for name, (grad_a, grad_b, *_) in batch.items():
            m = by_name.get(name)
            if m is None:
                raise ValueError(f"the bank has no decoder for {name!r}; it covers {len(by_name)} matrices "
                                 f"({sorted({x.role for x in self.matrices})})")
            if grad_a.shape[-2:] != (r, m.d_in) or grad_b.shape[-2:] != (m.d_out, r):
                raise ValueError(f"{name}: expected grad_A [{r}, {m.d_in}] and grad_B [{m.d_out}, {r}], "
                                 f"got {list(grad_a.shape[-2:])} and {list(grad_b.shape[-2:])}")

    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "model_id": self.model_id,
            "weights_sha256": self.weights_sha256,
            "lora_spec": self.spec.model_dump(mode="json"),
            "lora_fingerprint": self.spec.fingerprint(),
            "kinds": self.kinds,
            "options": self.decoders.options,
            "matrices": [asdict(m) for m in self.matrices],
            "info": self.info,
        }

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the bank folder atomically (a reader never sees half a bank)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.decoders.state_dict().items()}
        with atomic_dir(path, overwrite=overwrite) as tmp:
            save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
            (tmp / MANIFEST).write_text(json.dumps(self.manifest(), indent=2))

    @classmethod
    def load(cls, path: str | Path, model_id: str | None = None, weights_sha256: str | None = None,
             spec: LoraSpec | None = None, transfer: str | None = None, device: str = "cpu",
             target: tuple[list[MatrixInfo], dict[str, Tensor]] | None = None) -> "DecoderBank":
        """Load a bank; refuses (ValueError naming both sides) a model or LoRA spec it was not trained for.

        ``model_id``/``weights_sha256``: the model the decoders will be used on; a mismatch is accepted
        only with a transfer mode: ``same_shapes`` (a target of the proxy's architecture, e.g. its
        fine-tune) or ``by_role_depth`` (any target: ``target`` gives its adapted matrices and their input
        covariances; ``load_for_model`` computes both from the model).
        ``spec``: the LoRA spec the caller's gradients come from; it must equal the bank's (for
        ``by_role_depth``, up to the target module names).
        """
        path = Path(path)
        if transfer is not None and transfer not in TRANSFER_MODES:
            raise ValueError(f"unknown transfer mode {transfer!r}: choose one of {list(TRANSFER_MODES)} or None")
        if not (path / MANIFEST).is_file() or not (path / WEIGHTS).is_file():
            raise ValueError(f"{path} is not a decoder bank (needs {MANIFEST} and {WEIGHTS}); train one with `r2f train`")
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: unsupported bank format {manifest.get('format')!r}, this version reads {FORMAT!r}")
        bank_spec = LoraSpec.model_validate(manifest["lora_spec"])
        model_mismatch = []
        if model_id is not None and model_id != manifest["model_id"]:
            model_mismatch.append(f"model id {manifest['model_id']!r} (bank) vs {model_id!r} (requested)")
        if weights_sha256 is not None and weights_sha256 != manifest["weights_sha256"]:
            model_mismatch.append(f"weights sha256 {manifest['weights_sha256'][:12]}... (bank) vs "
                                  f"{weights_sha256[:12]}... (requested)")
        mapping = bool(model_mismatch) and transfer == "by_role_depth"
        # Role/depth mapping onto another model checks the spec itself, up to the target module names.
        if spec is not None and spec != bank_spec and not mapping:
            raise ValueError(f"LoRA spec mismatch: the bank at {path} was trained for {bank_spec.model_dump()} "
                             f"(fingerprint {bank_spec.fingerprint()}) but the gradients come from {spec.model_dump()} "
                             f"(fingerprint {spec.fingerprint()}). Decoders invert one spec's A0, so no transfer mode "
                             "applies: train a bank for this spec, or probe with the bank's spec")
        if model_mismatch and transfer is None:
            raise ValueError(f"model mismatch for the bank at {path}: {'; '.join(model_mismatch)}. Load it with "
                             "transfer='same_shapes' to reuse proxy decoders on a model of the same architecture "
                             "(e.g. a fine-tune of the proxy), transfer='by_role_depth' for a model of other "
                             "shapes, or train a bank on this model")
        if mapping and target is None:
            raise ValueError("transfer='by_role_depth' needs the target's adapted matrices and input covariances: "
                             "use DecoderBank.load_for_model(path, model, ...), which takes them from forward passes")
        matrices = [MatrixInfo(**m) for m in manifest["matrices"]]
        decoders = DecoderSet(matrices, bank_spec, manifest["kinds"], manifest.get("options") or {})
        state = load_file(str(path / WEIGHTS))
        for k, v in state.items():  # banks from before a token feature existed: it gets coefficient 0
            if k.endswith(".token_coef") and v.shape[-1] < len(TOKEN_FEATURES):
                state[k] = torch.nn.functional.pad(v, (0, len(TOKEN_FEATURES) - v.shape[-1]))
        missing, unexpected = decoders.load_state_dict(state, strict=False)
        # Banks from before token weights, request mixes or the output-side prior: none fitted (zeros, NaN = the
        # pairs' mix, an output-side mix of 1 = the orthogonal projection onto B0's span).
        missing = [k for k in missing if not k.endswith((".token_coef", ".request_mix_logit", ".out_cross", ".out_gram",
                                                         ".out_mix"))]
        if missing or unexpected:
            raise ValueError(f"{path}: decoder weights do not match the manifest (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); the bank is damaged, retrain it")
        bank = cls(decoders.to(device), manifest["model_id"], manifest["weights_sha256"], manifest.get("info"))
        if mapping:
            matrices, covariances = target
            bank = bank.map_by_role_depth(matrices, spec or bank_spec, model_id, weights_sha256, covariances).to(device)
        bank.transfer = transfer if model_mismatch else None
        return bank

    @classmethod
    def load_for_model(cls, path: str | Path, model: torch.nn.Module, model_id: str, weights_sha256: str,
                       transfer: str | None = None, calibration_ids: Tensor | None = None) -> "DecoderBank":
        """Load a bank for ``model``, on the model's device. With ``transfer="by_role_depth"`` the bank is
        mapped onto the model's matrices of the bank's roles, calibrated on the input covariances of one
        forward pass over ``calibration_ids`` [B, T] (e.g. ``assets.calibration_ids(tokenizer)``)."""
        device = next(model.parameters()).device
        target = None
        if not (Path(path) / MANIFEST).is_file():
            raise ValueError(f"{path} is not a decoder bank (needs {MANIFEST}); train one with `r2f train`")
        manifest = json.loads((Path(path) / MANIFEST).read_text())
        own = (manifest.get("model_id"), manifest.get("weights_sha256")) == (model_id, weights_sha256)
        if transfer == "by_role_depth" and not own:  # the bank's own model needs no mapping
            if calibration_ids is None:
                raise ValueError("transfer='by_role_depth' calibrates on the target: pass calibration_ids")
            targets = manifest["lora_spec"]["target_modules"]
            matrices = resolve_targets(model, targets if isinstance(targets, str) else list(targets))
            target = (matrices, input_covariance(model, [m.name for m in matrices], calibration_ids.to(device)))
        return cls.load(path, model_id, weights_sha256, transfer=transfer, device=str(device), target=target)


def _init_from_covariance(decoders: DecoderSet, covariances: dict[str, Tensor], ridge: float) -> None:
    for group in decoders.groups.values():
        if group.kind in ("linear", "activation"):
            missing = [n for n in group.names if n not in covariances]
            if missing:
                raise ValueError(f"no input covariance for {missing[:3]}")
            group.init_covariance(torch.stack([covariances[n] for n in group.names]), ridge)


def _views(cap: Capture, recorder: AttentionRecorder, example: int, names: list[str], output: bool) -> dict[str, RequestView]:
    """``RequestView`` per matrix of one example; with ``output`` the output energies, which also weight
    the attention energies' query positions (``output_query_energy``)."""
    scored = cap.scored_tokens(example)
    energy = cap.output_energy_tokens(example) if output else None
    sigma = None if energy is None else output_query_energy(energy, scored)
    attention = recorder.energies(example, cap.token_mask[example], names, sigma)
    return {n: RequestView(cap.factors(n, example)[0], scored, attention.get(n), energy) for n in names}
