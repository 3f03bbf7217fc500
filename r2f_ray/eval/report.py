"""Reports of an evaluation result: a Markdown table and a self-contained HTML page with plots."""

from __future__ import annotations

import base64
import html
import io
import math

from r2f_ray.eval.metrics import TIGHTER_BUDGETS, paired_forgetting, tighter_usr_key

COLUMNS = [("usr", "USR %", "up"), *((tighter_usr_key(f), f"USR % at {f}x KL", "up") for f in TIGHTER_BUDGETS),
           ("apr", "APR %", "up"), ("neighbour_retention", "neighbours kept %", "up"),
           ("gur_ppl", "GUR ppl %", "up"), ("gur_mc", "GUR MC %", "up"), ("mia_kl", "MIA KL", "down"),
           ("rap", "RAP %", "down"), ("recon_cosine", "cos to exact", "up"), ("step", "step", ""),
           ("seconds_per_deletion", "s / deletion", "down"), ("peak_mem_mb", "peak MiB", "down")]


_UNMEASURED = {"mean": float("nan"), "std": float("nan"), "n": 0}  # results from before a column existed


def _fmt(cell: dict, key: str) -> str:
    m, s = cell["mean"], cell["std"]
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    digits = 4 if key in ("mia_kl", "step") else (3 if key == "recon_cosine" else 1)
    text = f"{m:.{digits}f}"
    return text + (f" ± {s:.{digits}f}" if cell["n"] > 1 and s else "")


def markdown_table(result: dict) -> str:
    runs = result["config"]["runs"]
    spec = (result.get("lora_specs") or [None])[0]  # results written before it was recorded have none
    lora = f"; LoRA r={spec['r']}, {spec['init']} init" if spec else ""
    lines = [f"Model {result['model']}; decoder bank: {result['bank']}{lora}; {result['config']['facts']} facts x {runs} run(s); "
             f"step {result['config']['step']!r}; views {result['config']['views']}"
             + ("; mean ± std over runs" if runs > 1 else ""), "",
             "| method | " + " | ".join(label + (" ↑" if d == "up" else " ↓" if d == "down" else "") for _, label, d in COLUMNS)
             + " | rejected |",
             "| --- | " + " | ".join("---:" for _ in COLUMNS) + " | ---: |"]
    for method, row in result["table"].items():
        lines.append(f"| {method} | " + " | ".join(_fmt(row.get(k, _UNMEASURED), k) for k, _, _ in COLUMNS)
                     + f" | {row['rejected']}/{row['deletions']} |")
    methods = list(result["table"])
    if len(methods) > 1:
        lines += ["", "Fact by fact (facts answered before; p: exact two-sided sign test on the facts one forgot and the "
                      "other did not):", "",
                  "| methods | facts | both forgot | only the first | only the second | neither | p |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                pair = paired_forgetting(result["rows"], a, b)
                lines.append(f"| {a} vs {b} | {pair['facts']} | {pair['both']} | {pair[f'only_{a}']} | {pair[f'only_{b}']} | "
                             f"{pair['neither']} | {pair['sign_test_p']:.3f} |")
    if result.get("parts"):
        lines += ["", f"Merged from {len(result['parts'])} results of one fact sample (each method's rows from the parts "
                      "that ran it; cosine to exact only where exact ran in the same part):"]
        lines += [f"- {', '.join(p['methods'])}: facts {p['fact_offset'] + 1}-{p['fact_offset'] + p['facts']} "
                  f"(bank {p['bank']})" for p in result["parts"]]
    if result.get("sequential"):
        lines += ["", "Sequential run (facts forgotten one after another on one model):", "",
                  "| method | facts | USR % so far | GUR ppl % | neighbours kept % | rejected |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for method, curve in result["sequential"].items():
            for point in curve:
                lines.append(f"| {method} | {point['facts']} | {point['usr']:.1f} | {point['gur_ppl']:.1f} | "
                             f"{point['neighbour_retention']:.1f} | {int(point['rejected'])} |")
    if result.get("membership"):
        mem = result["membership"]
        lines += ["", f"Membership inference on {mem['forgotten']} forgotten fictitious facts vs never-seen ones "
                      f"(loss-based AUC, 0.5 ideal): before {mem['auc_before']:.3f}", "",
                  "| method | AUC after | rejected |", "| --- | ---: | ---: |"]
        for method, v in mem["methods"].items():
            lines.append(f"| {method} | {v['auc_after']:.3f} | {v['rejected']} |")
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(result: dict) -> list[tuple[str, str]]:
    """(caption, base64 PNG) pairs: the headline metrics per method, and the sequential curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    methods = list(result["table"])
    keys = [("usr", "USR"), ("apr", "APR"), ("neighbour_retention", "neighbours kept"), ("gur_ppl", "GUR (ppl)")]
    fig, ax = plt.subplots(figsize=(max(6, len(methods) * 1.2), 3.6))
    width = 0.8 / len(keys)
    for j, (k, label) in enumerate(keys):
        vals = [result["table"][m][k]["mean"] for m in methods]
        errs = [result["table"][m][k]["std"] for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], vals, width, yerr=errs, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods, rotation=20)
    ax.set_ylabel("%")
    ax.legend(fontsize=8, ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    out.append(("Headline metrics per method (mean over facts; error bars: std over runs)", _png(fig)))
    plt.close(fig)
    if result.get("sequential"):
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for method, curve in result["sequential"].items():
            x = [p["facts"] for p in curve]
            for ax, (k, label) in zip(axes, [("usr", "USR so far %"), ("gur_ppl", "GUR ppl %"), ("neighbour_retention", "neighbours kept %")]):
                ax.plot(x, [p[k] for p in curve], marker="o", label=method)
                ax.set_title(label, fontsize=9)
                ax.set_xlabel("facts forgotten")
        axes[0].legend(fontsize=8)
        out.append(("Sequential forgetting", _png(fig)))
        plt.close(fig)
    return out


def html_report(result: dict) -> str:
    table = markdown_table(result)
    rows = [line for line in table.splitlines()]
    body = []
    for block in "\n".join(rows).split("\n\n"):
        lines = block.splitlines()
        if lines and lines[0].startswith("|"):
            head = [c.strip() for c in lines[0].strip("|").split("|")]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            for line in lines[2:]:
                body.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>")
            body.append("</table>")
        else:
            body.append("<p>" + html.escape(block) + "</p>")
    figures = "".join(f"<figure><img src='data:image/png;base64,{png}'><figcaption>{html.escape(cap)}</figcaption></figure>"
                      for cap, png in plots(result))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>r2f evaluate: {html.escape(result['model'])}</title>"
            f"<style>{style}</style></head><body><h1>Unlearning evaluation</h1>{''.join(body)}{figures}"
            f"<p>Wall time {result.get('wall_s', 0):.0f} s. Metric definitions: docs/evaluation.md.</p></body></html>")


def write_reports(result: dict, folder) -> dict:
    """result.json, report.md, report.html in ``folder`` (each written atomically)."""
    from pathlib import Path

    from r2f_ray.io import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "result.json", result)
    paths = {"json": folder / "result.json", "markdown": folder / "report.md", "html": folder / "report.html"}
    for key, text in (("markdown", markdown_table(result) + "\n"), ("html", html_report(result))):
        tmp = paths[key].with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(paths[key])
    return {k: str(v) for k, v in paths.items()}
