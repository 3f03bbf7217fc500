"""Closed form, per matrix (not a trained bank): does the joint Gaussian posterior given grad_B AND grad_A (zero-offset init) beat the sequential
decode (input side, then output-side correction)? And do per-token weights read from grad_A (|P_t|^2, P = D B0)
help? Per matrix: exact G of single Wikipedia texts (loss on every token), closed form only.

    .venv/bin/python benchmarks/grad_a_weights.py o_proj            # roles, comma-separated; prints the table
"""
import itertools, sys

import torch
torch.set_num_threads(1)
from r2f_ray import assets
from r2f_ray.core.capture import capture_gradients
from r2f_ray.core.lora import LoraSpec, init_factors
from r2f_ray.core.targets import resolve_targets

roles = sys.argv[1].split(",") if len(sys.argv) > 1 else ["o_proj"]
layers = [2, 15, 27]
l = assets.load_model("default"); model, tok = l.model, l.tokenizer
texts = list(itertools.islice(assets.wiki_texts(), 40))
enc = [tok(t, add_special_tokens=False)["input_ids"][:48] for t in texts]
enc = [e for e in enc if len(e) == 48][:32]
prior_ids, eval_ids = enc[:24], enc[24:32]
names = [f"model.layers.{i}.self_attn.{r}" if r in ("q_proj", "k_proj", "v_proj", "o_proj") else f"model.layers.{i}.mlp.{r}"
         for r in roles for i in layers]
infos = {m.name: m for m in resolve_targets(model, names)}
spec = LoraSpec(r=8, init="zero_offset")

def caps(batch):
    ids = torch.tensor(batch)
    c = capture_gradients(model, ids, targets=names)
    return [{n: tuple(t.double() for t in c.factors(n, b)) for n in names} for b in range(len(batch))]

prior, evals = [], []
for i in range(0, 24, 4): prior += caps(prior_ids[i:i + 4])
for i in range(0, 8, 4): evals += caps(eval_ids[i:i + 4])

def cos(a, b): return float((a * b).sum() / (a.norm() * b.norm()))

def input_decode(yb, a0, X, w):
    sig = X.T @ (w[:, None] * X)
    return yb @ torch.linalg.solve(a0 @ sig @ a0.T, a0 @ sig)

def sequential(yb, ya, a0, b0, X, w, M):
    g = input_decode(yb, a0, X, w)
    C = b0.T @ M @ b0
    return g + M @ b0 @ torch.linalg.solve(C, ya - b0.T @ g)

def joint(yb, ya, a0, b0, X, w, M, Mp_pinv, ridge=1e-6):
    # D (T x d_out) with rows ~ N(0, w_t M), given D^T Z = yb (Z = X A0^T) and B0^T D^T X = ya.
    T = X.shape[0]
    XXt = X @ X.T
    P = torch.linalg.solve(XXt + ridge * torch.trace(XXt) / T * torch.eye(T, dtype=X.dtype), X @ ya.T)  # T x r
    Z = X @ a0.T
    K = Z.T @ (w[:, None] * Z)
    C = b0.T @ M @ b0
    MB0Cinv = M @ b0 @ torch.linalg.inv(C)
    R = yb - MB0Cinv @ P.T @ Z
    L1 = Mp_pinv @ R @ torch.linalg.inv(K)                          # d_out x r
    L2 = (P / w[:, None] - Z @ L1.T @ M @ b0) @ torch.linalg.inv(C)  # T x r
    D = w[:, None] * (Z @ L1.T + L2 @ b0.T) @ M
    return D.T @ X

res = {}
for n in names:
    info = infos[n]
    a0, b0 = (t.double() for t in init_factors(spec, info))
    Gs = [(x, d) for x, d in (p[n] for p in prior)]
    Mout = sum((d.T @ x) @ (d.T @ x).T / (d.T @ x).norm() ** 2 for x, d in Gs) / len(Gs)
    Mout = Mout / torch.trace(Mout) * info.d_out
    for lam in (0.1, 0.3, 1.0):
        M = (1 - lam) * Mout + lam * torch.eye(info.d_out, dtype=torch.float64)
        C = b0.T @ M @ b0
        Mp = M - M @ b0 @ torch.linalg.solve(C, b0.T @ M)
        Mp_pinv = torch.linalg.pinv(Mp, hermitian=True, rtol=1e-9)
        for e in evals:
            x, d = e[n]
            G = d.T @ x
            yb, ya = G @ a0.T, b0.T @ G
            T = x.shape[0]
            one = torch.ones(T, dtype=torch.float64)
            oracle = (d ** 2).sum(1) + 1e-12
            Pt = torch.linalg.solve(x @ x.T + 1e-6 * torch.trace(x @ x.T) / T * torch.eye(T, dtype=torch.float64), x @ ya.T)
            pw = (Pt ** 2).sum(1); pw = pw + 0.05 * pw.mean()
            out = {"seq w=1": sequential(yb, ya, a0, b0, x, one, M), "joint w=1": joint(yb, ya, a0, b0, x, one, M, Mp_pinv),
                   "seq w=|P|2": sequential(yb, ya, a0, b0, x, pw, M), "joint w=|P|2": joint(yb, ya, a0, b0, x, pw, M, Mp_pinv),
                   "seq oracle w": sequential(yb, ya, a0, b0, x, oracle, M), "joint oracle w": joint(yb, ya, a0, b0, x, oracle, M, Mp_pinv)}
            if lam == 1.0:
                out["input only w=1"] = input_decode(yb, a0, x, one)
                out["input only oracle w"] = input_decode(yb, a0, x, oracle)
                jo = out["joint w=1"]
                out["_check constraints"] = torch.tensor(max(float((jo @ a0.T - yb).norm() / yb.norm()), float((b0.T @ jo - ya).norm() / ya.norm())))
            for k, v in out.items():
                val = float(v) if k.startswith("_") else cos(v, G)
                res.setdefault((n.split(".")[-1], k, lam), []).append(val)
keys = sorted({(r, k) for r, k, _ in res})
for r, k in keys:
    print(f"{r:<10} {k:<22}", "  ".join(f"lam={lam}: {sum(v)/len(v):.3f}" for lam in (0.1, 0.3, 1.0) if (v := res.get((r, k, lam)))))
