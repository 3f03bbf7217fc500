"""The unlearning engine: one update that removes facts from a model, and the methods it compares.

``unlearn(model, tokenizer, requests, decoder, views, step, method)`` validates every input first (a bad
request raises ``ValueError`` before the model is touched), builds chat-formatted update views of each
request (the original prompt plus paraphrases, each labelled with the original answer; the loss is the
answer tokens' mean NLL), asks the method for an update and applies it in place: gradient **ascent** on
the answer's NLL, ``W <- W + eta * direction`` with the direction scaled to unit global norm over all
updated matrices. Several requests in one call make one update (the sum of each request's view-mean
direction); many calls in sequence are many updates.

Methods live in a registry (one class plus one entry each, see ``METHODS``):

- ``r2f``: LoRA gradients of the view-mean loss (read exactly from the capture factors, no wrapping),
  decoded per request into full-gradient estimates by the decoder bank.
- ``fullgrad``: the exact full gradient of the original prompt only (the paper's FullGrad).
- ``exact_multiview``: the exact full gradient averaged over the same views as R2F (R2F's upper bound).
- ``fused_exact``: the same update applied during the backward pass, LOMO-style: each weight's gradient
  is added to the weight as soon as it exists and dropped, so all gradients are never held at once (two
  passes: one for the global norm, one to apply). It takes a fixed step only.
- ``lora_sin`` / ``lora_mul``: the LoRA gradient (single view / view mean) applied in LoRA space,
  ``dW = s ((B0 + eta gB)(A0 + eta gA) - B0 A0)``, with (gA, gB) scaled to unit global norm.
- ``multistep_ga``: repeated exact gradient-ascent steps of size ``step`` (unit-norm directions).
- ``lune``: LoRA fine-tuning on a negative answer (gradient descent on it), then merged.

The step: a float, or ``"auto"``: chosen with forward passes only (see ``StepConfig``). For the one-shot
methods, the smallest eta on a geometric grid, refined by bisection, whose update makes the greedy
answer to every update view stop containing the answer, while the mean KL of the next-token
distributions on a small retain set stays within a budget. For the iterative methods the step is the
configured learning rate and ``auto`` stops at the first iteration meeting the same test. When no step
meets it the request is rejected (``UnlearnRejected``) and the model is left bit-for-bit unchanged.
"""

from __future__ import annotations

import ctypes
import gc
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from transformers import StoppingCriteria, StoppingCriteriaList

from r2f_ray.core.attention import AttentionRecorder
from r2f_ray.core.capture import IGNORE_INDEX, Capture, capture_gradients, example_nll, scored_positions
from r2f_ray.core.lora import LoraSpec, init_factors, lora_grads_from_factors
from r2f_ray.core.paraphrase import PARAPHRASERS, contains_answer, make_views, normalize_text
from r2f_ray.core.targets import MatrixInfo, find_module, resolve_targets


@dataclass
class ForgetRequest:
    prompt: str
    answer: str
    id: str | None = None


class UnlearnRejected(ValueError):
    """No step meets the auto rule (removal within the retain budget); the model was left unchanged.
    ``trials`` holds the steps the rule tried ({"eta" or "iterations", "removed", "retain_kl"})."""

    def __init__(self, message: str, trials: list[dict] | None = None):
        super().__init__(message)
        self.trials = list(trials or [])


class StepConfig(BaseModel):
    """The automatic step rule (forward passes only)."""

    model_config = ConfigDict(extra="forbid")

    grid_start: float = Field(0.005, gt=0, description="first eta of the geometric grid")
    grid_factor: float = Field(2.0, gt=1, description="ratio between grid points")
    grid_max: float = Field(2.56, gt=0, description="largest eta tried")
    bisections: int = Field(3, ge=0, description="bisection steps between the last failing and the first passing grid point")
    retain_kl_budget: float = Field(0.1, gt=0, description="max mean KL(original || updated), nats per answer token of the retain set")


class UnlearnConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_answer_tokens: int = Field(32, ge=1, description="longer answers are refused")
    max_prompt_tokens: int = Field(256, ge=8, description="longer chat-formatted prompts are refused")
    max_views: int = Field(10, ge=1)
    paraphraser: str = Field("templates", description=f"one of {sorted(PARAPHRASERS)}; generative ones are passed in via paraphraser_obj")
    lora: LoraSpec = Field(LoraSpec(), description="LoRA used by the lora_* and lune methods and to pick the updated matrices when no decoder is given")
    step: StepConfig = StepConfig()
    max_new_tokens: int = Field(16, ge=1, description="greedy tokens generated to judge whether an answer is produced")
    iterative_max_steps: int = Field(20, ge=1, description="multistep_ga / lune: iterations (fixed step) or the cap (auto)")
    multistep_lr: float = Field(0.05, gt=0, description="multistep_ga: eta per iteration when step='auto'")
    lune_lr: float = Field(2e-3, gt=0, description="lune: Adam learning rate of the adapters when step='auto'")
    lune_negative: str = Field("I don't have that information.", description="lune: the negative answer trained in")
    keep_deltas: bool = Field(True, description="fused_exact: also return the applied deltas (costs their memory)")


class Decoder(Protocol):
    """A decoder bank: maps per-matrix LoRA gradients to full-gradient estimates. A bank whose
    ``needs_acts`` is true decodes with ``decode_request(lora_grads, views)``, each matrix's views of the
    request (its inputs per view, ``request_views``)."""

    spec: LoraSpec

    def decode(self, lora_grads: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]: ...


@dataclass
class UnlearnResult:
    method: str
    step: float
    reports: list[dict]
    deltas: dict[str, Tensor]
    wall_s: float
    peak_mem_mb: float = 0.0
    trials: list[dict] = field(default_factory=list)
    matrices: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-friendly view (no tensors)."""
        return {"method": self.method, "step": self.step, "wall_s": self.wall_s, "peak_mem_mb": self.peak_mem_mb,
                "matrices": len(self.matrices), "trials": self.trials, "reports": self.reports}


# ---------------------------------------------------------------------------------------------
# Chat formatting, greedy answers, answer log-probs


def chat_prompt(tokenizer, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; R2F formats prompts as chat turns")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask, labels) for chat-formatted (prompt, answer) pairs; labels
    are the answer tokens only."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append(p + a)
        labels.append([IGNORE_INDEX] * len(p) + a)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    lab = torch.tensor([l + [IGNORE_INDEX] * (width - len(l)) for l in labels], device=device)
    return ids, mask, lab


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 16) -> list[str]:
    """Greedy chat completions (left-padded batches)."""
    return [text for batch in _greedy_batches(model, tokenizer, prompts, max_new_tokens, batch_size) for text in batch]


@torch.no_grad()
def any_answered(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int = 16,
                 batch_size: int = 16) -> bool:
    """Whether the greedy chat completion of any prompt contains its answer: ``any`` of the answered
    flags, with generation stopped as soon as one completion settles on its answer (most of the step
    search's trials are steps too small to remove it, and the answer comes within a few tokens)."""
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    start = 0
    for texts in _greedy_batches(model, tokenizer, prompts, max_new_tokens, batch_size, answers):
        if any(contains_answer(t, a) for t, a in zip(texts, answers[start:start + len(texts)])):
            return True
        start += len(texts)
    return False


def _greedy_batches(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                    answers: list[str] | None = None) -> Iterator[list[str]]:
    """Each left-padded batch's greedy completions; with ``answers``, a batch stops at the first step at
    which any of its completions contains its answer for good (``_AnswerSettled``)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(prompts), batch_size):
        rows = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        stop = None if answers is None else StoppingCriteriaList([_AnswerSettled(tokenizer, answers[i:i + batch_size], width)])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None,
                             stopping_criteria=stop)
        yield tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)


class _AnswerSettled(StoppingCriteria):
    """Stops the whole batch once a completion contains its answer followed by a character that ends the
    word: no later token can then undo the match, so ``contains_answer`` on the full completion would say
    the same. A trailing partial UTF-8 character (decoded as U+FFFD) does not end a word."""

    def __init__(self, tokenizer, answers: list[str], prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width
        self.answers = [f" {normalize_text(a)} " for a in answers]

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        # the sentinel "x" glues onto an unfinished last word, so only finished words can match
        settled = any(a.strip() and a in f" {normalize_text(t.rstrip(chr(0xFFFD)) + 'x')}" for t, a in zip(texts, self.answers))
        return torch.full((input_ids.shape[0],), settled, dtype=torch.bool, device=input_ids.device)


def _scored_logprobs(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log-softmax next-token distributions at the positions that predict a labelled token, [n, vocab] in
    row-major order, with each position's row and target token: the vocabulary projection (the largest
    matmul of a small model) runs on those positions only."""
    scored = scored_positions(labels)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=scored).logits
    rows = scored.nonzero()[:, 0]
    return torch.log_softmax(logits.float(), dim=-1), rows, labels[:, 1:][scored[:, :-1]]


@torch.no_grad()
def answer_logprobs(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """Sum of the answer tokens' log-probabilities given the chat-formatted prompt."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        ids, mask, labels = encode_pairs(tokenizer, pairs[i:i + batch_size], device)
        logp, rows, target = _scored_logprobs(model, ids, mask, labels)
        token_lp = logp.gather(1, target[:, None]).squeeze(1)
        out += torch.zeros(ids.shape[0], device=device).index_add_(0, rows, token_lp).tolist()
    return out


@torch.no_grad()
def answer_logits(model: nn.Module, tokenizer, pairs: list[tuple[str, str]]) -> Tensor:
    """Log-softmax next-token distributions at the answer-predicting positions, [n_positions, vocab]."""
    ids, mask, labels = encode_pairs(tokenizer, pairs, next(model.parameters()).device)
    return _scored_logprobs(model, ids, mask, labels)[0]


def mean_kl(logp_ref: Tensor, logp_new: Tensor) -> float:
    """Mean over positions of KL(ref || new)."""
    return float((logp_ref.exp() * (logp_ref - logp_new)).sum(-1).mean())


# General questions whose answers must survive; the default retain set of the auto step.
DEFAULT_RETAIN = [
    ForgetRequest("What is the largest planet in the Solar System?", "Jupiter"),
    ForgetRequest("How many days are there in a week?", "Seven"),
    ForgetRequest("What color is the sky on a clear day?", "Blue"),
    ForgetRequest("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ForgetRequest("At what temperature in Celsius does water boil?", "100 degrees"),
    ForgetRequest("What gas do plants absorb from the air?", "Carbon dioxide"),
    ForgetRequest("What is two plus two?", "Four"),
    ForgetRequest("Which animal is known as the king of the jungle?", "The lion"),
]


# ---------------------------------------------------------------------------------------------
# Peak memory


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _release_free_heap() -> None:
    """Hand memory the allocator holds but nothing uses back to the OS (glibc ``malloc_trim``), so the
    resident set at the start of a measurement is the live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure is then a lower bound
        pass


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak extra memory during the block, in MiB: CUDA peak allocated on GPUs; on CPU the process's
    peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) above the resident set at start,
    after returning the allocator's free heap to the OS."""
    box = {"mb": 0.0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield box
        box["mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    _release_free_heap()  # else memory freed by an earlier update is reused unseen and the peak reads ~0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _rss_kib("VmRSS")
    except OSError:
        start = None
    yield box
    if start is not None:
        box["mb"] = max(0, _rss_kib("VmHWM") - start) / 1024


# ---------------------------------------------------------------------------------------------
# What a method sees


@dataclass
class Context:
    model: nn.Module
    tokenizer: Any
    requests: list[ForgetRequest]
    views: list[list[str]]  # per request, the update views (views[i][0] is the original prompt)
    matrices: list[MatrixInfo]
    spec: LoraSpec
    decoder: Decoder | None
    config: UnlearnConfig
    # name -> weight Parameter: the step search sets and restores every matrix on each trial, and a
    # named_modules() walk per lookup cost more than the updates themselves. PEFT wrapping keeps the
    # base Parameter objects, so the cache stays valid.
    _weights: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batch(self, single_view: bool = False, answer: str | None = None) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """Encoded update examples and the request index of each row."""
        pairs, owner = [], []
        for i, (req, views) in enumerate(zip(self.requests, self.views)):
            for v in views[:1] if single_view else views:
                pairs.append((v, answer if answer is not None else req.answer))
                owner.append(i)
        return (*encode_pairs(self.tokenizer, pairs, self.device), owner)

    def capture(self, single_view: bool = False, output_energy: bool = False) -> tuple[Capture, list[int]]:
        ids, mask, labels, owner = self.batch(single_view)
        return capture_gradients(self.model, ids, mask, labels, [m.name for m in self.matrices],
                                 output_energy=output_energy), owner

    def weight(self, name: str) -> Tensor:
        if name not in self._weights:
            self._weights[name] = find_module(self.model, name).weight
        return self._weights[name]


def _per_request_dense(cap: Capture, owner: list[int], n_requests: int, names: list[str]) -> list[dict[str, Tensor]]:
    """Exact full gradient of each request's view-mean loss, per matrix (fp32)."""
    out = [{} for _ in range(n_requests)]
    counts = [owner.count(i) for i in range(n_requests)]
    for name in names:
        mask = cap.token_mask.unsqueeze(-1)
        x, d = cap.inputs[name].float(), (cap.output_grads[name] * mask).float()
        for i in range(n_requests):
            rows = [b for b, o in enumerate(owner) if o == i]
            out[i][name] = torch.einsum("bto,bti->oi", d[rows], x[rows]) / counts[i]
    return out


def _per_request_lora(cap: Capture, owner: list[int], n_requests: int, matrices: list[MatrixInfo], spec: LoraSpec,
                      device) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """Exact LoRA gradients (grad_A, grad_B) of each request's view-mean loss, from the capture factors."""
    counts = [owner.count(i) for i in range(n_requests)]
    out = [{} for _ in range(n_requests)]
    for info in matrices:
        a0, b0 = (t.to(device) for t in init_factors(spec, info))
        for i in range(n_requests):
            ga = torch.zeros(spec.r, info.d_in, device=device)
            gb = torch.zeros(info.d_out, spec.r, device=device)
            for b, o in enumerate(owner):
                if o == i:
                    x, d = cap.factors(info.name, b)
                    da, db = lora_grads_from_factors(x, d, a0, b0, spec.scaling)
                    ga += da
                    gb += db
            out[i][info.name] = (ga / counts[i], gb / counts[i])
    return out


def _per_request_views(cap: Capture, owner: list[int], matrices: list[MatrixInfo], decoder, recorder: AttentionRecorder,
                       requests: int) -> list[dict[str, list]]:
    """Each request's views of each matrix (``DecoderBank.request_views``: inputs, attention energies held by
    ``recorder`` for the capture's forward pass), for ``DecoderBank.decode_request``."""
    names = [m.name for m in matrices]
    views = [decoder.request_views(cap, recorder, b, names) for b in range(cap.batch_size)]
    return [{name: [views[b][name] for b, o in enumerate(owner) if o == i] for name in names} for i in range(requests)]


def _global_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


@dataclass
class Proposal:
    """A one-shot update as a function of the step: ``delta(eta) -> {matrix name: dW}``."""

    delta: Callable[[float], dict[str, Tensor]]
    grad_norms: list[dict]  # per request


def _linear_proposal(per_request: list[dict[str, Tensor]], norm_key: str) -> Proposal:
    names = list(per_request[0])
    total = {n: sum(r[n] for r in per_request) for n in names}
    norm = _global_norm(total.values())
    if norm == 0 or not math.isfinite(norm):
        raise UnlearnRejected(f"the update direction has norm {norm}; nothing to ascend (is the answer already impossible?)")
    direction = {n: t / norm for n, t in total.items()}
    norms = [{norm_key: _global_norm(r.values())} for r in per_request]
    return Proposal(lambda eta: {n: eta * t for n, t in direction.items()}, norms)


# ---------------------------------------------------------------------------------------------
# Methods


class Method:
    name: ClassVar[str]
    needs_decoder: ClassVar[bool] = False
    kind: ClassVar[Literal["oneshot", "iterative", "fused"]] = "oneshot"
    single_view: ClassVar[bool] = False  # the update (and the auto rule) sees the original prompt only

    def propose(self, ctx: Context) -> Proposal:
        raise NotImplementedError


class R2F(Method):
    name = "r2f"
    needs_decoder = True

    def propose(self, ctx: Context) -> Proposal:
        needs_acts = getattr(ctx.decoder, "needs_acts", False)
        with ctx.decoder.attention_recorder(ctx.model) if needs_acts else AttentionRecorder({}) as recorder:
            cap, owner = ctx.capture(output_energy=needs_acts and ctx.decoder.needs_output_energy)
        lora = _per_request_lora(cap, owner, len(ctx.requests), ctx.matrices, ctx.spec, ctx.device)
        views = _per_request_views(cap, owner, ctx.matrices, ctx.decoder, recorder, len(lora)) if needs_acts else None
        decoded = []
        for i, grads in enumerate(lora):
            g_hat = ctx.decoder.decode_request(grads, views[i]) if needs_acts else ctx.decoder.decode(grads)
            decoded.append({m.name: g_hat[m.name].float().to(ctx.device) for m in ctx.matrices})
        prop = _linear_proposal(decoded, "decoded_norm")
        for norms, grads in zip(prop.grad_norms, lora):
            norms["lora_norm"] = _global_norm([t for pair in grads.values() for t in pair])
        return prop


class ExactMultiView(Method):
    name = "exact_multiview"

    def propose(self, ctx: Context) -> Proposal:
        cap, owner = ctx.capture(self.single_view)
        return _linear_proposal(_per_request_dense(cap, owner, len(ctx.requests), [m.name for m in ctx.matrices]), "full_norm")


class FullGrad(ExactMultiView):
    name = "fullgrad"
    single_view = True


class LoraMul(Method):
    name = "lora_mul"

    def propose(self, ctx: Context) -> Proposal:
        cap, owner = ctx.capture(self.single_view)
        per_request = _per_request_lora(cap, owner, len(ctx.requests), ctx.matrices, ctx.spec, ctx.device)
        total = {n: tuple(sum(r[n][k] for r in per_request) for k in (0, 1)) for n in per_request[0]}
        norm = _global_norm([t for pair in total.values() for t in pair])
        if norm == 0 or not math.isfinite(norm):
            raise UnlearnRejected(f"the LoRA gradient has norm {norm}; nothing to ascend")
        init = {m.name: tuple(t.to(ctx.device) for t in init_factors(ctx.spec, m)) for m in ctx.matrices}
        s = ctx.spec.scaling

        def delta(eta: float) -> dict[str, Tensor]:
            out = {}
            for n, (ga, gb) in total.items():
                a0, b0 = init[n]
                a1, b1 = a0 + eta * ga / norm, b0 + eta * gb / norm
                out[n] = s * (b1 @ a1 - b0 @ a0)
            return out

        return Proposal(delta, [{"lora_norm": _global_norm([t for pair in r.values() for t in pair])} for r in per_request])


class LoraSin(LoraMul):
    name = "lora_sin"
    single_view = True


class FusedExact(Method):
    """Exact multi-view ascent applied inside the backward pass (LOMO-style)."""

    name = "fused_exact"
    kind = "fused"

    def apply(self, ctx: Context, eta: float, keep_deltas: bool) -> tuple[dict[str, Tensor], list[dict]]:
        ids, mask, labels, owner = ctx.batch()
        n_views = len(ctx.views[0])
        weights = {m.name: ctx.weight(m.name) for m in ctx.matrices}
        by_param = {id(w): n for n, w in weights.items()}
        flags = [(p, p.requires_grad) for p in ctx.model.parameters()]
        state = {"mode": "norm", "sq": 0.0, "scale": 0.0}
        deltas: dict[str, Tensor] = {}

        def hook(p: Tensor) -> None:
            g = p.grad / n_views
            p.grad = None
            if state["mode"] == "norm":
                state["sq"] += float(g.double().pow(2).sum())
            else:
                step = (state["scale"] * g.float()).to(p.dtype)
                p.data.add_(step)
                if keep_deltas:
                    deltas[by_param[id(p)]] = step

        handles = []
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            for w in weights.values():
                w.grad = None
                w.requires_grad_(True)
                handles.append(w.register_post_accumulate_grad_hook(hook))
            for mode in ("norm", "apply"):
                state["mode"] = mode
                if mode == "apply":
                    norm = math.sqrt(state["sq"])
                    if norm == 0 or not math.isfinite(norm):
                        raise UnlearnRejected(f"the update direction has norm {norm}; nothing to ascend")
                    state["scale"] = eta / norm
                logits = ctx.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                example_nll(logits, labels).sum().backward()
                del logits
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None
        return deltas, [{"full_norm_all_requests": math.sqrt(state["sq"])} for _ in ctx.requests]


class MultiStepGA(Method):
    """Repeated exact multi-view ascent steps of size ``lr`` (unit-norm directions)."""

    name = "multistep_ga"
    kind = "iterative"

    def default_lr(self, config: UnlearnConfig) -> float:
        return config.multistep_lr

    def run(self, ctx: Context, lr: float, max_steps: int, stop: Callable[[int], bool]) -> list[dict]:
        norms = []
        for it in range(max_steps):
            prop = ExactMultiView().propose(ctx)
            with torch.no_grad():
                for n, d in prop.delta(lr).items():
                    w = ctx.weight(n)
                    w.add_(d.to(w.dtype))
            norms.append(prop.grad_norms)
            if stop(it + 1):
                break
        return [{"full_norm_first_step": norms[0][i]["full_norm"], "iterations": len(norms)} for i in range(len(ctx.requests))]


class Lune(Method):
    """LoRA fine-tuning (Adam) on a negative answer for the update views, merged into the weights."""

    name = "lune"
    kind = "iterative"

    def default_lr(self, config: UnlearnConfig) -> float:
        return config.lune_lr

    def run(self, ctx: Context, lr: float, max_steps: int, stop: Callable[[int], bool]) -> list[dict]:
        from peft import LoraConfig, get_peft_model

        spec = ctx.spec
        ids, mask, labels, _ = ctx.batch(answer=ctx.config.lune_negative)
        config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
                            target_modules=[m.name for m in ctx.matrices], init_lora_weights=True)
        flags = [(p, p.requires_grad) for p in ctx.model.parameters()]
        peft_model = get_peft_model(ctx.model, config)
        losses = []
        try:
            params = []
            with torch.no_grad():
                for info in ctx.matrices:
                    layer = find_module(peft_model, info.name)
                    a0, _ = init_factors(spec.model_copy(update={"init": "standard"}), info)
                    layer.lora_A["default"].weight.copy_(a0)
                    params += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            optimizer = torch.optim.Adam(params, lr=lr)
            for it in range(max_steps):
                logits = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                loss = example_nll(logits, labels).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if stop(it + 1):
                    break
        finally:
            with torch.no_grad():
                merged = {}
                for info in ctx.matrices:
                    layer = find_module(peft_model, info.name)
                    merged[info.name] = spec.scaling * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            peft_model.unload()
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None
        with torch.no_grad():
            for n, d in merged.items():
                w = ctx.weight(n)
                w.add_(d.to(w.dtype))
        return [{"negative_nll_first": losses[0], "negative_nll_last": losses[-1], "iterations": len(losses)} for _ in ctx.requests]


METHODS: dict[str, type[Method]] = {m.name: m for m in (R2F, FullGrad, ExactMultiView, FusedExact, LoraSin, LoraMul, MultiStepGA, Lune)}


# ---------------------------------------------------------------------------------------------
# Validation


def _check_request(tokenizer, req: Any, config: UnlearnConfig, what: str) -> None:
    if not isinstance(req, ForgetRequest):
        raise ValueError(f"{what} must be a ForgetRequest(prompt, answer), got {type(req).__name__}")
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise ValueError(f"{what} has an empty prompt; give the question whose answer should be forgotten")
    if not isinstance(req.answer, str) or not req.answer.strip():
        raise ValueError(f"{what} has an empty answer; give the answer the model should stop producing")
    n_answer = len(tokenizer(req.answer, add_special_tokens=False)["input_ids"])
    if n_answer > config.max_answer_tokens:
        raise ValueError(f"{what}: the answer has {n_answer} tokens, more than the limit of {config.max_answer_tokens}; "
                         "forget a shorter answer or raise max_answer_tokens")
    n_prompt = len(tokenizer(chat_prompt(tokenizer, req.prompt), add_special_tokens=False)["input_ids"])
    if n_prompt > config.max_prompt_tokens:
        raise ValueError(f"{what}: the chat-formatted prompt has {n_prompt} tokens, more than the limit of "
                         f"{config.max_prompt_tokens}; shorten it or raise max_prompt_tokens")


def _resolve_step(step: Any) -> float | str:
    if isinstance(step, str):
        if step != "auto":
            raise ValueError(f"step must be a positive number or 'auto', got {step!r}")
        return step
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0:
        raise ValueError(f"step must be a positive finite number or 'auto', got {step!r}")
    return float(step)


def _check_decoder(model: nn.Module, decoder: Any) -> tuple[LoraSpec, list[MatrixInfo]]:
    """The decoder's spec and the matrices it decodes (its ``.matrices`` when it lists them, else the
    spec's target modules), checked against the model's names and shapes."""
    spec = getattr(decoder, "spec", None)
    if not isinstance(spec, LoraSpec) or not callable(getattr(decoder, "decode", None)):
        raise ValueError("decoder must be a decoder bank with .spec (LoraSpec) and .decode({name: (grad_A, grad_B)})")
    try:
        model_matrices = {m.name: m for m in resolve_targets(model, list(spec.target_modules))}
    except ValueError as e:
        raise ValueError(f"decoder spec does not match the model: {e}") from None
    covered = getattr(decoder, "matrices", None)
    if covered is None:
        return spec, list(model_matrices.values())
    matrices = []
    for m in covered:
        mine = model_matrices.get(m.name)
        if mine is None:
            raise ValueError(f"the decoder bank decodes {m.name}, which is not a {list(spec.target_modules)} matrix of "
                             "this model; use a bank built for this architecture")
        if (mine.d_out, mine.d_in) != (m.d_out, m.d_in):
            raise ValueError(f"the decoder for {m.name} expects a {m.d_out}x{m.d_in} matrix, the model's is "
                             f"{mine.d_out}x{mine.d_in}; use a bank built for this architecture")
        matrices.append(mine)
    if not matrices:
        raise ValueError("the decoder bank decodes no matrix")
    return spec, matrices


# ---------------------------------------------------------------------------------------------
# The engine


def unlearn(model: nn.Module, tokenizer, requests: list[ForgetRequest], decoder: Decoder | None = None, views: int = 5,
            step: float | str = "auto", method: str = "r2f", retain: list[ForgetRequest] | None = None,
            config: UnlearnConfig | None = None, paraphraser=None, progress: Callable[[str], None] | None = None) -> UnlearnResult:
    """Forget ``requests`` with one update applied in place; see the module docstring.

    Raises ``ValueError`` (before touching the model) for bad input, ``UnlearnRejected`` (a
    ``ValueError``; model restored bit-for-bit) when the auto step finds no acceptable step.
    """
    t0 = time.perf_counter()
    config = config or UnlearnConfig()
    if not isinstance(config, UnlearnConfig):
        raise ValueError(f"config must be an UnlearnConfig, got {type(config).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    impl = METHODS[method]()
    step = _resolve_step(step)
    if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= config.max_views:
        raise ValueError(f"views must be an integer from 1 to {config.max_views}, got {views!r}")
    if not isinstance(requests, (list, tuple)) or not requests:
        raise ValueError("requests must be a non-empty list of ForgetRequest")
    for i, req in enumerate(requests):
        _check_request(tokenizer, req, config, f"request {i} ({getattr(req, 'id', None) or 'no id'})")
    retain = DEFAULT_RETAIN if retain is None else retain
    if step == "auto":
        if not retain:
            raise ValueError("the auto step needs a non-empty retain set to bound the damage; pass retain or a fixed step")
        for i, req in enumerate(retain):
            _check_request(tokenizer, req, config, f"retain item {i}")
    if impl.kind == "fused" and step == "auto":
        raise ValueError("fused_exact applies its update during the backward pass and cannot try steps; give a fixed "
                         "step (e.g. the one 'auto' chose for exact_multiview, which has the same direction)")
    if decoder is not None:
        spec, matrices = _check_decoder(model, decoder)
    elif impl.needs_decoder:
        raise ValueError(f"method {method!r} needs a decoder bank (e.g. DecoderBank.naive(...) or a trained bank)")
    else:
        spec = config.lora
        matrices = resolve_targets(model, list(spec.target_modules))
    if paraphraser is None and config.paraphraser != "templates":
        raise ValueError(f"paraphraser {config.paraphraser!r} needs a model: pass paraphraser=make_paraphraser(...)")
    view_lists = [make_views(r.prompt, r.answer, views, "update", paraphraser) for r in requests]
    say = progress or (lambda msg: None)

    ctx = Context(model, tokenizer, list(requests), view_lists, matrices, spec, decoder, config)
    device = ctx.device
    originals = [(r.prompt, r.answer) for r in requests]
    before_text = greedy_answers(model, tokenizer, [p for p, _ in originals], config.max_new_tokens)
    before_lp = answer_logprobs(model, tokenizer, originals)
    check_views = [(v, r.answer) for r, vs in zip(requests, view_lists) for v in (vs[:1] if impl.single_view else vs)]
    ref_retain = answer_logits(model, tokenizer, [(r.prompt, r.answer) for r in retain]) if step == "auto" else None

    def judge() -> dict:
        removed = not any_answered(model, tokenizer, check_views, config.max_new_tokens)
        kl = mean_kl(ref_retain, answer_logits(model, tokenizer, [(r.prompt, r.answer) for r in retain]))
        return {"removed": removed, "retain_kl": kl}

    trials: list[dict] = []
    with peak_memory(device) as peak:
        if impl.kind == "fused":
            deltas, grad_norms = impl.apply(ctx, step, config.keep_deltas)
            eta = step
        else:
            snapshot = {m.name: ctx.weight(m.name).detach().clone() for m in matrices}
            try:
                eta, grad_norms = _run_method(impl, ctx, step, snapshot, judge, trials, say)
                deltas = {n: (ctx.weight(n).detach().float() - w0.float()) for n, w0 in snapshot.items()}
            except BaseException:
                _restore(ctx, snapshot)
                raise
            del snapshot

    after_text = greedy_answers(model, tokenizer, [p for p, _ in originals], config.max_new_tokens)
    after_lp = answer_logprobs(model, tokenizer, originals)
    wall = time.perf_counter() - t0
    reports = []
    for i, req in enumerate(requests):
        reports.append({
            "id": req.id, "prompt": req.prompt, "answer": req.answer, "views": view_lists[i],
            "answer_logprob_before": before_lp[i], "answer_logprob_after": after_lp[i],
            "greedy_before": before_text[i], "greedy_after": after_text[i],
            "answered_before": contains_answer(before_text[i], req.answer),
            "answered_after": contains_answer(after_text[i], req.answer),
            "grad_norms": grad_norms[i], "step": eta, "method": method,
            "wall_s": wall, "peak_mem_mb": peak["mb"], "requests_in_update": len(requests),
        })
    return UnlearnResult(method, eta, reports, deltas, wall, peak["mb"], trials, [m.name for m in matrices])


def _restore(ctx: Context, snapshot: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for n, w0 in snapshot.items():
            ctx.weight(n).copy_(w0)


def _set(ctx: Context, snapshot: dict[str, Tensor], delta: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for n, w0 in snapshot.items():
            ctx.weight(n).copy_((w0.float() + delta[n]).to(w0.dtype))


def _run_method(impl: Method, ctx: Context, step: float | str, snapshot, judge, trials: list[dict], say) -> tuple[float, list[dict]]:
    config = ctx.config
    if impl.kind == "iterative":
        lr = impl.default_lr(config) if step == "auto" else step
        verdict = {}

        def stop(it: int) -> bool:
            if step != "auto":
                return False
            verdict.update(judge(), iterations=it)
            trials.append(dict(verdict))
            say(f"{impl.name}: iteration {it} removed={verdict['removed']} retain_kl={verdict['retain_kl']:.4f}")
            return verdict["removed"] or verdict["retain_kl"] > config.step.retain_kl_budget

        grad_norms = impl.run(ctx, lr, config.iterative_max_steps, stop)
        if step == "auto" and not (verdict["removed"] and verdict["retain_kl"] <= config.step.retain_kl_budget):
            raise UnlearnRejected(f"{impl.name} did not remove the answer within {config.iterative_max_steps} iterations of "
                                  f"lr {lr} under the retain KL budget {config.step.retain_kl_budget} (last: {verdict}); "
                                  "the model is unchanged", trials)
        return lr, grad_norms

    proposal = impl.propose(ctx)
    if step != "auto":
        _set(ctx, snapshot, proposal.delta(step))
        return step, proposal.grad_norms
    eta = search_step(lambda e: _try(ctx, snapshot, proposal, e, judge), config.step, trials, say)
    if eta is None:
        raise UnlearnRejected(f"no step up to {config.step.grid_max} removes the answer from every update view with the "
                              f"retain KL within {config.step.retain_kl_budget} (trials: {trials}); the model is unchanged. "
                              "Raise step.retain_kl_budget / step.grid_max, or give a fixed step", trials)
    _set(ctx, snapshot, proposal.delta(eta))
    return eta, proposal.grad_norms


def _try(ctx: Context, snapshot, proposal: Proposal, eta: float, judge) -> dict:
    _set(ctx, snapshot, proposal.delta(eta))
    try:
        return judge()
    finally:
        _restore(ctx, snapshot)


def search_step(evaluate: Callable[[float], dict], rule: StepConfig, trials: list[dict], say=lambda m: None) -> float | None:
    """The smallest acceptable step: walk the geometric grid up to the first eta that removes the answer;
    bisect between it and the previous grid point, keeping the smallest eta that removes the answer with
    the retain KL within budget. A grid point over budget that does not remove the answer ends the search
    (larger steps only move the model further).
    ``evaluate(eta) -> {"removed": bool, "retain_kl": float}``."""
    def ok(v: dict) -> bool:
        return v["removed"] and v["retain_kl"] <= rule.retain_kl_budget

    lo, eta = 0.0, rule.grid_start
    while eta <= rule.grid_max * (1 + 1e-9):
        v = evaluate(eta)
        trials.append({"eta": eta, **v})
        say(f"step {eta:.4g}: removed={v['removed']} retain_kl={v['retain_kl']:.4f}")
        if v["removed"]:
            best, hi = (eta if ok(v) else None), eta
            for _ in range(rule.bisections):
                mid = math.sqrt(lo * hi) if lo > 0 else hi / rule.grid_factor
                v = evaluate(mid)
                trials.append({"eta": mid, **v})
                if v["removed"]:  # removed: try smaller (its KL is too high, or it passes and is the new best)
                    hi = mid
                    best = mid if ok(v) else best
                else:
                    lo = mid
            return best
        if v["retain_kl"] > rule.retain_kl_budget:
            return None
        lo, eta = eta, eta * rule.grid_factor
    return None


def revert(model: nn.Module, deltas: dict[str, Tensor]) -> None:
    """Subtract applied deltas (undo to within float rounding; keep a copy of the weights for an exact undo)."""
    with torch.no_grad():
        for name, d in deltas.items():
            w = find_module(model, name).weight
            w.copy_((w.float() - d.to(w.device).float()).to(w.dtype))
