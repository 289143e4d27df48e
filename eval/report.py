"""Readable reports from scoring results: a Markdown file with tables and PNG plots beside it
(per-category bars, the closed-question confusion matrix), the other harnesses' protocols with their
defects, and the headline lines printed to the console.

`write_report(results, "out/report.md")` takes the metrics.json dict built by
`medllava.eval.results` (an `eval run`'s settings and counts, under "run", become the report's last
section) and returns the paths it wrote. The Markdown is rendered whole in memory and written once.
Plots are drawn on matplotlib's Agg canvas, so no display is needed. Every file is written atomically.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from medllava.io import atomic_write_text, save_png

MAX_BAR_CATEGORIES = 15  # categories plotted per breakdown, commonest first

STRICT_ROWS = (("closed_accuracy", "closed accuracy (first yes/no or option)"),
               ("open_exact_match", "open exact match"), ("open_f1", "open token F1"),
               ("overall_accuracy", "overall accuracy (closed right, open exact)"))
LLAVA_MED_ROWS = (
    ("closed_accuracy", "yes/no accuracy: truth inside prediction"),
    ("closed_accuracy_gated", "yes/no accuracy, run_eval.py gate"),
    ("closed_recall", "closed recall"),
    ("open_recall", "open recall (the paper's open number)"),
    ("open_hit", "open accuracy: truth inside prediction"),
    ("open_candidate_accuracy", "open accuracy, candidate matching"),
    ("exact_match", "exact match score"), ("f1", "f1 score"), ("precision", "precision"),
    ("bleu", "bleu_score"), ("bleu_1", "bleu_score_1"), ("bleu_2", "bleu_score_2"), ("bleu_3", "bleu_score_3"),
)
BAR_SERIES = (("strict_closed_accuracy", "closed, strict"), ("llava_med_closed_accuracy", "closed, LLaVA-Med"),
              ("strict_open_f1", "open F1, strict"), ("llava_med_open_recall", "open recall, LLaVA-Med"))


def pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals, "n/a" for None."""
    return "n/a" if value is None else f"{100 * value:.2f}"


def metric_cell(metric: dict | None) -> str:
    """"value [lo, hi]" in percent for a {"value", "ci95"} metric, "n/a" when it has no value."""
    if not metric or metric.get("value") is None:
        return "n/a"
    ci = metric.get("ci95")
    return pct(metric["value"]) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; "|" and newlines inside cells are escaped."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def slug(text: str) -> str:
    """`text` as a file-name part: lower case, runs of other characters as "_"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "plot"


def _headline(results: dict) -> str:
    """The headline table: closed and open questions, strict beside LLaVA-Med-compatible."""
    s, m = results.get("strict", {}), results.get("llava_med", {})
    rows = [
        ("closed", results.get("n_closed", 0), metric_cell(s.get("closed_accuracy")), metric_cell(m.get("closed_accuracy"))),
        ("open", results.get("n_open", 0), "EM " + metric_cell(s.get("open_exact_match")) + "; F1 "
         + metric_cell(s.get("open_f1")), "recall " + metric_cell(m.get("open_recall"))),
    ]
    return table(("questions", "n", "strict", "LLaVA-Med-compatible"), rows)


def _family_table(family: dict, rows: Sequence[tuple[str, str]]) -> str:
    """One row per metric of `rows` that the family has: label, value with interval, n."""
    body = []
    for key, label in rows:
        if key in family:
            metric = family[key]
            n = str(metric["n"]) + (f" ({metric['n_scored']} scored)" if "n_scored" in metric else "")
            body.append((label, metric_cell(metric), n))
    return table(("metric", "% [95% CI]", "n"), body)


def _breakdown_table(groups: dict) -> str:
    """One row per category with its headline numbers."""
    rows = [(cat, g["n"], pct(g["strict_closed_accuracy"]), pct(g["strict_open_exact_match"]), pct(g["strict_open_f1"]),
             pct(g["llava_med_closed_accuracy"]), pct(g["llava_med_open_recall"])) for cat, g in groups.items()]
    return table(("category", "n", "closed strict", "open EM", "open F1", "closed LLaVA-Med", "open recall LLaVA-Med"), rows)


def _protocol_rows(name: str, entry: dict) -> list[tuple]:
    """The harness row of one protocol and, where it has one, its corrected row."""
    label = f"{name} ({entry['harness']} `{entry['commit'][:7]}`)"
    rows = []
    for variant, key in (("", "scores"), (", corrected", "corrected")):
        sc = entry.get(key)
        if sc:
            rows.append((label + variant, pct(sc["closed"]), pct(sc["open"]), pct(sc["overall"]),
                         f"{sc['n_closed']} / {sc['n_open']}", entry["comparable_to"]))
    return rows


def _protocols(protocols: dict) -> list[str]:
    """The protocols section: one table of numbers, the closed rules, the defects with both numbers."""
    applied = {name: e for name, e in protocols.items() if e.get("applies")}
    if not applied:
        return []
    rows = [row for name, entry in applied.items() for row in _protocol_rows(name, entry)]
    out = ["## Other harnesses' protocols (%)", "",
           "Each number as that harness's own code computes it (repository and commit named), and corrected "
           "where the harness has a known defect. Compare a number only with the tables named beside it.", "",
           table(("protocol", "closed", "open", "overall", "n closed / open", "comparable to"), rows), ""]
    out += [f"- {name}: {e['closed_rule']} ({e['repository']}, {e['file']})" for name, e in applied.items()]
    skipped = [f"{name} ({e['reason']})" for name, e in protocols.items() if not e.get("applies")]
    if skipped:
        out.append("- not applicable: " + ", ".join(skipped))
    defects = [(name, d["name"], d["description"], d["metric"], pct(d["harness"]),
                "not computed" if d["corrected"] is None else pct(d["corrected"]))
               for name, e in applied.items() for d in e["defects"]]
    if defects:
        out += ["", "### Known defects: the number as the harness gives it and with only that defect fixed", "",
                table(("protocol", "defect", "what", "number", "harness", "corrected"), defects)]
    return out + [""]


def render_markdown(results: dict, plots: dict[str, str] | None = None) -> str:
    """The report text; `plots` maps a breakdown name (or "confusion") to an image path."""
    plots = plots or {}
    title = f"# {results.get('task', 'evaluation')} ({results.get('split', '?')})"
    out = [title, ""]
    facts = [("questions", f"{results.get('n', 0)} ({results.get('n_closed', 0)} closed, {results.get('n_open', 0)} open)")]
    for key, label in (("source", "ground truth"), ("predictions", "predictions")):
        if results.get(key):
            facts.append((label, f"`{results[key]}`"))
    pairing = results.get("pairing")
    if pairing:
        facts.append(("pairing", pairing["note"]))
        if pairing.get("missing"):
            facts.append(("missing predictions", f"{len(pairing['missing'])} questions scored as empty answers"))
        if pairing.get("skipped_rows"):
            facts.append(("skipped prediction rows", str(len(pairing["skipped_rows"]))))
    if results.get("skipped_ground_truth"):
        facts.append(("skipped ground-truth records", str(len(results["skipped_ground_truth"]))))
    boot = results.get("bootstrap", {})
    facts.append(("intervals", f"{boot.get('n_boot', 0)} bootstrap resamples, seed {boot.get('seed')}"))
    out += [f"- {k}: {v}" for k, v in facts]
    out += ["", "## Headline (% [95% CI])", "", _headline(results), ""]
    out += ["## Strict", "", _family_table(results.get("strict", {}), STRICT_ROWS), ""]
    out += ["## LLaVA-Med-compatible", "",
            "The numbers LLaVA-Med's scorer prints, with its quirks: a closed answer is right when the "
            "normalized truth appears anywhere in the prediction (\"no\" inside \"normal\"), and open recall "
            "counts repeated words.", "", _family_table(results.get("llava_med", {}), LLAVA_MED_ROWS), ""]
    out += _protocols(results.get("protocols", {}))
    for name, groups in results.get("breakdowns", {}).items():
        if name != "answer type" and len(groups) < 2:
            continue  # one category says nothing beyond the headline
        out += [f"## By {name}", "", _breakdown_table(groups), ""]
        if name in plots:
            out += [f"![{name}]({plots[name]})", ""]
    conf = results.get("confusion", {})
    if conf.get("rows"):
        out += ["## Closed questions: truth (rows) against the answer read (columns)", "",
                table(("truth \\ answer", *conf["columns"]), [(lab, *row) for lab, row in zip(conf["rows"], conf["matrix"])]),
                ""]
        if "confusion" in plots:
            out += [f"![confusion]({plots['confusion']})", ""]
    if "run" in results:
        out += ["## Run", "", table(("setting", "value"), [(k, _cell(v)) for k, v in results["run"].items()]), ""]
    return "\n".join(out)


def _cell(value: object) -> str:
    """A run setting as a table cell: lists joined, dicts counted, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return str(len(value))
    return str(value)


def plot_breakdown(name: str, groups: dict, path: Path) -> None:
    """Grouped bars of the headline numbers per category."""
    import numpy as np
    from matplotlib.figure import Figure

    cats = list(groups)[:MAX_BAR_CATEGORIES]
    x = np.arange(len(cats))
    width = 0.8 / len(BAR_SERIES)
    fig = Figure(figsize=(max(6.0, 0.9 * len(cats) + 2), 4.2))
    ax = fig.add_subplot()
    for i, (key, label) in enumerate(BAR_SERIES):
        heights = [100 * groups[c][key] if groups[c][key] is not None else np.nan for c in cats]
        ax.bar(x + (i - (len(BAR_SERIES) - 1) / 2) * width, heights, width, label=label)
    ax.set_xticks(x, [f"{c}\n(n={groups[c]['n']})" for c in cats], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"by {name}")
    ax.legend(fontsize=7, ncols=2)
    save_png(fig, path)


def plot_confusion(conf: dict, path: Path) -> None:
    """Heatmap of closed-question counts with the count written in each cell."""
    import numpy as np
    from matplotlib.figure import Figure

    rows, columns, matrix = conf["rows"], conf["columns"], np.array(conf["matrix"])
    fig = Figure(figsize=(max(4.0, 0.6 * len(columns) + 2), max(3.0, 0.6 * len(rows) + 1.5)))
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("answer read from the prediction (strict)")
    ax.set_ylabel("truth")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > threshold else "black")
    save_png(fig, path)


def write_report(results: dict, md_path: str | Path) -> list[Path]:
    """Write the Markdown report and its plots (`<stem>_<breakdown>.png`) beside it."""
    md_path = Path(md_path)
    written: list[Path] = []
    plots: dict[str, str] = {}
    for name, groups in results.get("breakdowns", {}).items():
        if len(groups) >= 2:
            path = md_path.with_name(f"{md_path.stem}_{slug(name)}.png")
            plot_breakdown(name, groups, path)
            plots[name] = path.name
            written.append(path)
    if results.get("confusion", {}).get("rows"):
        path = md_path.with_name(f"{md_path.stem}_confusion.png")
        plot_confusion(results["confusion"], path)
        plots["confusion"] = path.name
        written.append(path)
    atomic_write_text(md_path, render_markdown(results, plots))
    return [md_path, *written]


def print_summary(results: dict) -> None:
    """Print the headline numbers (strict and LLaVA-Med closed accuracy, open F1 and recall) with intervals."""
    s, m = results["strict"], results["llava_med"]
    for label, metric in (("strict closed accuracy", s.get("closed_accuracy")),
                          ("strict open token F1", s.get("open_f1")),
                          ("LLaVA-Med closed accuracy", m.get("closed_accuracy")),
                          ("LLaVA-Med open recall", m.get("open_recall"))):
        if metric and metric["value"] is not None:
            ci = f" [{100 * metric['ci95'][0]:.2f}, {100 * metric['ci95'][1]:.2f}]" if metric["ci95"] else ""
            print(f"{label}: {100 * metric['value']:.2f}{ci} (n={metric['n']})")
