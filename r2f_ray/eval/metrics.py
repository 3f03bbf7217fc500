"""Unlearning metrics. Each is a small function with a stated rule; the harness composes them.

Conventions: rates are percentages (0-100); "before" and "after" refer to the model before and after
the update; a fact counts as *answered* when the normalised answer occurs as whole words in the greedy
chat completion (``contains_answer``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from r2f_ray.core.capture import IGNORE_INDEX, example_nll
from r2f_ray.core.linalg import cosine
from r2f_ray.core.paraphrase import contains_answer
from r2f_ray.core.unlearn import answer_logprobs, chat_prompt, encode_pairs, greedy_answers


def _rate(hits: int, total: int) -> float:
    return 100.0 * hits / total if total else float("nan")


def usr(before: list[bool], after: list[bool]) -> float:
    """Unlearning success rate: among prompts answered before, the share no longer answered after."""
    known = [a for b, a in zip(before, after, strict=True) if b]
    return _rate(sum(not a for a in known), len(known))


# Fractions of the retain KL budget at which evaluations also report USR, from the auto rule's trials
# (``removal_kl``): how far each method's direction forgets under a stricter budget.
TIGHTER_BUDGETS = (0.3, 0.1)


def tighter_usr_key(fraction: float) -> str:
    """The result-table key of USR at ``fraction`` of the retain KL budget."""
    return f"usr_at_{fraction}x_kl"


def removal_kl(trials: list[dict]) -> float | None:
    """The retain KL the auto step rule paid for removing the answer: the least ``retain_kl`` among the steps
    it tried that removed it (None: none did). The rule bisects down to the smallest removing step whatever
    its KL, so this is the cost of forgetting along the method's direction, apart from the budget."""
    costs = [t["retain_kl"] for t in trials if t.get("removed")]
    return min(costs) if costs else None


def paired_forgetting(rows: list[dict], a: str, b: str) -> dict:
    """Methods ``a`` and ``b`` fact by fact, on the facts (run, fact) both ran and the model answered before:
    how many each forgot that the other did not, how many both or neither forgot, and the exact two-sided
    sign-test p-value of the discordant facts (the chance of a split at least this uneven if either method
    were as likely to be the one that forgets)."""
    def forgotten(method):
        return {(r["run"], r["fact"]): not r["answered_after"] for r in rows if r["method"] == method and r["answered_before"]}

    fa, fb = forgotten(a), forgotten(b)
    common = fa.keys() & fb.keys()
    only_a = sum(fa[key] and not fb[key] for key in common)
    only_b = sum(fb[key] and not fa[key] for key in common)
    discordant, fewer = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(discordant, i) for i in range(fewer + 1)) / 2**discordant) if discordant else 1.0
    return {"facts": len(common), "both": sum(fa[key] and fb[key] for key in common), f"only_{a}": only_a,
            f"only_{b}": only_b, "neither": sum(not fa[key] and not fb[key] for key in common), "sign_test_p": p}


def retention(before: list[bool], after: list[bool]) -> float:
    """Neighbour retention: among items answered before, the share still answered after."""
    known = [a for b, a in zip(before, after, strict=True) if b]
    return _rate(sum(known), len(known))


def answered(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int = 16) -> list[bool]:
    """Whether the greedy chat answer to each prompt contains its answer."""
    texts = greedy_answers(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
    return [contains_answer(t, a) for t, (_, a) in zip(texts, pairs)]


def answer_rank(model: nn.Module, tokenizer, prompt: str, answer: str, alternatives: list[str]) -> int:
    """Rank (1 = most likely) of the answer's log-probability among itself and the alternatives."""
    scores = answer_logprobs(model, tokenizer, [(prompt, a) for a in [answer] + list(alternatives)])
    return 1 + sum(s > scores[0] for s in scores[1:])


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], tokens: int = 64, batch_size: int = 8) -> float:
    """exp of the mean token NLL over the first ``tokens`` tokens of each text (plain text, no chat)."""
    device = next(model.parameters()).device
    rows = [r for r in (tokenizer(t, add_special_tokens=False)["input_ids"][:tokens] for t in texts) if len(r) >= 2]
    if not rows:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    total = 0.0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in batch], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        total += float(example_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels, reduction="sum").sum())
    return math.exp(total / sum(len(r) - 1 for r in rows))


def mc_accuracy(model: nn.Module, tokenizer, questions: list[tuple[str, list[str], int]]) -> float:
    """Multiple choice: the option with the highest mean per-token answer log-probability wins; % correct."""
    pairs = [(prompt, o) for prompt, options, _ in questions for o in options]
    scores = iter(s / len(tokenizer(o, add_special_tokens=False)["input_ids"])
                  for s, (_, o) in zip(answer_logprobs(model, tokenizer, pairs), pairs))
    correct = 0
    for _, options, right in questions:
        mine = [next(scores) for _ in options]
        correct += int(max(range(len(options)), key=mine.__getitem__) == right)
    return _rate(correct, len(questions))


def gur(before: float, after: float, lower_is_better: bool = False) -> float:
    """General utility retention, 100 x after/before (before/after for perplexity-like scores); NaN
    when the reference is zero (nothing to retain)."""
    if (after if lower_is_better else before) == 0:
        return float("nan")
    return 100.0 * (before / after if lower_is_better else after / before)


@torch.no_grad()
def next_token_logprobs(model: nn.Module, tokenizer, prompts: list[str], batch_size: int = 16) -> Tensor:
    """Log-softmax of the next-token distribution after each chat-formatted prompt, [n, vocab]."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        last = torch.zeros_like(mask, dtype=torch.bool)  # right padding: each row's last real position
        last[torch.arange(len(rows)), mask.sum(1) - 1] = True
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=last).logits
        out.append(torch.log_softmax(logits.float(), -1).cpu())
    return torch.cat(out)


def identity_alignment(logp_before: Tensor, logp_after: Tensor) -> dict:
    """MIA as the R2F paper defines it (model identity alignment): how far the updated model's next-token
    distributions on general prompts moved. Reports the mean KL(before || after) (0 = identical), the
    mean cosine of the probability vectors (1 = identical) and the share of unchanged argmax tokens."""
    p, q = logp_before.exp(), logp_after.exp()
    kl = (p * (logp_before - logp_after)).sum(-1)
    cos = torch.nn.functional.cosine_similarity(p, q, dim=-1)
    same = (logp_before.argmax(-1) == logp_after.argmax(-1)).float()
    return {"kl": float(kl.mean()), "cosine": float(cos.mean()), "top1_agreement": 100.0 * float(same.mean())}


def auc(positive: list[float], negative: list[float]) -> float:
    """Area under the ROC curve of a score separating positives from negatives (Mann-Whitney; ties 1/2)."""
    if not positive or not negative:
        raise ValueError("AUC needs at least one positive and one negative score")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def membership_auc(model: nn.Module, tokenizer, members: list[tuple[str, str]], non_members: list[tuple[str, str]]) -> float:
    """Loss-based membership inference: score = mean answer log-prob per token; AUC of forgotten facts
    (members of the fine-tuning set) against never-seen facts. 0.5 means the attack cannot tell them apart."""
    def scores(pairs):
        lp = answer_logprobs(model, tokenizer, pairs)
        return [s / len(tokenizer(a, add_special_tokens=False)["input_ids"]) for s, (_, a) in zip(lp, pairs)]

    return auc(scores(members), scores(non_members))


def relearn(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], steps: int = 5, lr: float = 1e-4) -> nn.Module:
    """A copy of ``model`` fine-tuned (Adam, all weights) for a fixed budget on (prompt, answer) pairs."""
    attacked = copy.deepcopy(model).train()
    ids, mask, labels = encode_pairs(tokenizer, pairs, next(attacked.parameters()).device)
    opt = torch.optim.Adam(attacked.parameters(), lr=lr)
    for _ in range(steps):
        loss = example_nll(attacked(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return attacked.eval()


def rap(model: nn.Module, tokenizer, targets: list[tuple[str, str]], paraphrases: list[list[str]], steps: int = 5,
        lr: float = 1e-4, max_new_tokens: int = 16) -> float:
    """Relearning attack precision: fine-tune on paraphrases of the targets (their answers, then the end of
    turn) for a
    fixed budget, then ask the original prompts: % answered again (lower is better)."""
    end = tokenizer.eos_token or ""  # the answer closes the assistant turn, as in chat fine-tuning
    pairs = [(p, a + end) for (_, a), ps in zip(targets, paraphrases) for p in ps]
    attacked = relearn(model, tokenizer, pairs, steps, lr)
    hits = answered(attacked, tokenizer, targets, max_new_tokens)
    return _rate(sum(hits), len(hits))


def reconstruction_cosine(estimate: dict[str, Tensor], exact: dict[str, Tensor]) -> dict:
    """Cosine of an update (or gradient estimate) to the exact one: global, and mean per role."""
    names = sorted(set(estimate) & set(exact))
    if not names:
        raise ValueError("no matrix in common between the two updates")
    flat = cosine(torch.cat([estimate[n].flatten().float() for n in names]), torch.cat([exact[n].flatten().float() for n in names]))
    roles: dict[str, list[float]] = {}
    for n in names:
        roles.setdefault(n.rsplit(".", 1)[-1].removesuffix("_proj"), []).append(cosine(estimate[n], exact[n]))
    return {"global": flat, "by_role": {r: sum(v) / len(v) for r, v in roles.items()}}
