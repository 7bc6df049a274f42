"""report.json → report.md, report.html (plots embedded as base64 PNG) and a rich table on the console."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from audit import REPORT_SCHEMA_VERSION
from audit.queries.summary import query_lines


class ReportError(RuntimeError):
    """A report directory without a readable report.json of a known schema."""


def load_report(report_dir: str | Path) -> dict:
    path = Path(report_dir) / "report.json"
    if not path.exists():
        raise ReportError(f"{report_dir}: no report.json; run `audit run ... --out {report_dir}` first")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from exc
    if report.get("schema_version") != REPORT_SCHEMA_VERSION:
        raise ReportError(f"{path}: schema version {report.get('schema_version')!r}, this audit reads "
                          f"{REPORT_SCHEMA_VERSION}")
    return report


def summarise_mean(values) -> float:
    return sum(values) / len(values)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _signed(v) -> str:
    return "–" if v is None else f"{100 * v:+.2f}"


def _pts(v) -> str:
    """A value already in points, signed."""
    return "–" if v is None else f"{v:+.2f}"


def _interval(ci) -> str:
    return "–" if not ci else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def _config(entry: dict) -> str:
    """The chosen configuration of a family, e.g. 'kd-T4-a0.5' (its name) or '' for a single one."""
    sel = entry.get("selected")
    return f" ({sel})" if sel and sel != entry.get("attack") else ""


def reference_family(report: dict) -> str:
    """The verdict's label-only reference: `ls`, or the `ls@strategy` that won on validation (audit.queries)."""
    return (report["verdict"].get("reference") or {}).get("family") or "ls"


def _ls_accuracy(report: dict) -> str:
    s = report["references"].get(reference_family(report), {}).get("summary") or {}
    return f"{100 * s['mean']:.2f}%" if s.get("mean") is not None else "–"


def _reference_words(report: dict) -> str:
    """'the label-smoothing student (LS 88.30%)', or the winning label-only student on a strategy's inputs."""
    ref = reference_family(report)
    if ref == "ls":
        return f"the label-smoothing student (LS {_ls_accuracy(report)})"
    return f"the best label-only student ({ref}, {_ls_accuracy(report)}: LS on {ref.split('@', 1)[1]} inputs)"


def describe_verdict(report: dict) -> str:
    """The verdict in words a user can act on (docs/design.md §3), with the LS student's accuracy beside every Δ."""
    v, t = report["verdict"], report["training"]
    ref = _reference_words(report)
    tried = [n for n, e in report["attacks"].items() if e.get("status") == "ok"]
    confidence = f"{100 * (1 - v['alpha_per_look']):g}%"
    scope = (f"Student {report['student']}, {t['train_rows']} transfer rows of {report['dataset']} "
             f"({t['val_rows']} more for validation), {v['seeds']} paired seeds; attacks not tried are not covered.")
    plateau = t.get("converged") or {}
    caveat = f" Caution: {plateau['note']}." if plateau.get("before_plateau") else ""
    fams = v.get("families") or {}
    outcome = v.get("outcome")
    if outcome is None:
        return ("No verdict: the audit was interrupted or a reference student is missing; rerun the same command "
                "to resume.")
    if outcome == "undistillable":
        worst = max(fams, key=lambda n: fams[n]["upper"])
        return (f"UNDISTILLABLE against the {len(tried)} attack families tried: each gains at most "
                f"+{v['margin']:g} points over {ref} at {confidence} confidence "
                f"(largest upper bound {_pts(fams[worst]['upper'])}, {worst}{_config(report['attacks'][worst])}). "
                + scope + caveat)
    if outcome == "distillable":
        winners = sorted((n for n, f in fams.items() if f["distillable"]), key=lambda n: fams[n]["p_holm"])
        best = winners[0]
        f = fams[best]
        others = f"; also {', '.join(winners[1:])}" if len(winners) > 1 else ""
        return (f"DISTILLABLE: {best}{_config(report['attacks'][best])} beats {ref} by {_pts(f['mean'])} points "
                f"({confidence} lower bound {_pts(f['lower'])}, Holm-adjusted one-sided p = {f['p_holm']:.2g}){others}. " + scope + caveat)
    open_ = [n for n, f in fams.items() if not f["within_margin"]]
    worst = max(open_, key=lambda n: fams[n]["upper"] if fams[n]["upper"] is not None else float("inf"))
    need = v.get("seeds_to_decide")
    more = (f"about {need - v['seeds']} more seeds ({need} in all) would decide it at the observed spread "
            f"(--seeds {need}, or --seeds auto)" if need and need > v["seeds"] else
            "the observed spread says more seeds alone would not decide it: the gain sits near the margin")
    if v["seeds"] < 2:
        more = "one seed gives no spread to test with: run at least 3 paired seeds"
    return (f"INCONCLUSIVE after {v['seeds']} paired seeds: no attack family beats {ref} "
            f"significantly, but {len(open_)} of {len(fams)} cannot be bounded by +{v['margin']:g} points "
            f"(worst: {worst}{_config(report['attacks'][worst])}, Δ {_pts(fams[worst]['mean'])}, upper bound "
            f"{_pts(fams[worst]['upper'])}); {more}. " + scope + caveat)


def rows(report: dict) -> list[dict]:
    """One row per family (its chosen configuration), references first, for the tables."""
    out = []
    refs = report["references"]
    fams = report["verdict"].get("families") or {}
    ls = refs.get("ls", {})
    winner = reference_family(report)
    if ls.get("summary"):
        out.append({"name": f"LS (ε={ls['best_epsilon']:g}, {'reference' if winner == 'ls' else 'label-only'})",
                    "acc": ls["summary"], "delta": ls.get("delta"), "test": None, "status": "reference"})
    for name, e in refs.items():  # label-only students on a query strategy's inputs (audit.queries)
        if name not in ("ls", "ce") and e.get("summary"):
            role = "reference" if name == winner else "label-only"
            out.append({"name": f"{name} (ε={e['options']['epsilon']:g}, {role})", "acc": e["summary"],
                        "delta": e.get("delta"), "test": None, "status": "reference"})
    if refs.get("ce", {}).get("summary"):
        out.append({"name": "CE (labels only)", "acc": refs["ce"]["summary"], "delta": refs["ce"].get("delta"),
                    "test": None, "status": "reference"})
    for name, e in report["attacks"].items():
        status = e["status"]
        test = fams.get(name)
        if test is not None:
            status = "beats LS" if test["distillable"] else ("≤ margin" if test["within_margin"] else "undecided")
        out.append({"name": name + _config(e), "acc": e.get("summary"), "delta": e.get("delta"), "test": test,
                    "status": status, "reason": e.get("reason")})
    return out


def _cells(row: dict) -> tuple[str, ...]:
    """(student, accuracy, Δ, one-sided bounds, Holm p, status) as text for one table row."""
    acc, d, t = row["acc"], row["delta"], row["test"]
    std = lambda s: _pct(s["std"]) if s["std"] is not None else "–"  # noqa: E731
    acc_s = "–" if not acc else f"{_pct(acc['mean'])} ± {std(acc)}"
    d_s = "–" if not d else f"{_signed(d['mean'])} ± {std(d)}"
    bounds = "–" if not t or t["lower"] is None else f"[{_pts(t['lower'])}, {_pts(t['upper'])}]"
    p = "–" if not t or t["p_holm"] is None else f"{t['p_holm']:.3g}"
    status = row["status"] + (f" ({row['reason']})" if row.get("reason") else "")
    return row["name"], acc_s, d_s, bounds, p, status


HEADERS = ("student", "accuracy % (mean ± std)", "Δ vs LS (points, mean ± std)", "one-sided bounds (points)",
           "Holm p", "status")


def _selection_lines(report: dict) -> list[str]:
    lines = []
    for name, e in [("ls", report["references"].get("ls", {})), *report["attacks"].items()]:
        cands = e.get("candidates") or {}
        if len(cands) > 1:
            scored = ", ".join(f"{c} {_pct(x['validation_accuracy'])}" for c, x in cands.items())
            lines.append(f"- `{name}`: chose `{e.get('selected')}` on validation (mean accuracy over selection seeds "
                         f"{e.get('selection_seeds')}): {scored}")
    return lines


def _looks_text(v: dict) -> str:
    looks = v["looks"]
    if len(looks) == 1:
        return f"One look, at {looks[0]} paired seeds."
    return (f"--seeds auto: looks at {', '.join(map(str, looks))} seeds, α = {v['alpha']:g} split evenly "
            f"({v['alpha_per_look']:g} per look); stopped at {v['seeds']}.")


def render_markdown(report: dict) -> str:
    v, q, r, t = report["verdict"], report["queries"], report["recovery"], report["training"]
    lines = [f"# Distillation audit: {report['oracle']['source']}", "",
             f"**Outcome: {v.get('outcome') or 'none'}.** {v['statement']}", "",
             f"Rule (docs/design.md §3): distillable iff some family's one-sided paired t-test of Δ ≤ 0 rejects at "
             f"α = {v['alpha_per_look']:g} after Holm over the {len(v.get('families') or {})} families; undistillable "
             f"iff every family's one-sided {100 * (1 - v['alpha_per_look']):g}% upper bound is ≤ +{v['margin']:g} "
             f"points; inconclusive otherwise. " + _looks_text(v), ""]
    beyond = _beyond_labels_line(report)
    if beyond:
        lines += [beyond, ""]
    lines += [
        f"- model sha256 `{report['oracle']['model_sha256'][:16]}…`, mode `{report['oracle'].get('mode')}`, "
        f"output policy `{json.dumps(report['oracle']['output_policy'])}`",
        f"- dataset `{report['dataset']}`, student `{report['student']}`: {t['train_rows']} training rows, "
        f"{t['val_rows']} validation rows (every choice made there), seeds {t['seeds']}",
        f"- training: {t['schedule']} schedule, up to {t['epochs']} epochs, lr {t['lr']:g}, batch {t['batch_size']}, "
        f"best validation epoch kept" + (f", patience {t['patience']}" if t["patience"] else "")
        + f"; {t['converged']['note']}",
        f"- queries: {q['transfer_rows']} transfer rows; asked this run {q['asked_this_run']}, cached before "
        f"{q['cached_before_this_run']}; rows sent over all sessions {q['rows_sent_total']} in "
        f"{q['requests_total']} requests",
        *query_lines(report),
        f"- log-prob recovery: floor {r['floor']:g}, {r['clamped_entries']} of {r['entries']} entries clamped "
        f"({r['clamped_rows']} rows); label-only: {r['label_only']}",
        f"- teacher agreement with the transfer labels: {_pct(report['teacher']['transfer_agreement'])}%",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|---" * len(HEADERS) + "|",
    ]
    for row in rows(report):
        lines.append("| " + " | ".join(_cells(row)) + " |")
    selection = _selection_lines(report)
    if selection:
        lines += ["", "Choices made on the validation slice (the test split is used by the chosen ones only):", "",
                  *selection]
    controls = [(n, e["label_control"]) for n, e in report["attacks"].items() if e.get("label_control")]
    if controls:
        lines += ["", "Label-only controls (the same recipe trained on one-hot true labels; gain = attack − control, "
                  "what the teacher's answers add):", "", "| recipe | control accuracy % | gain (points) | 95% interval |",
                  "|---|---|---|---|"]
        for name, c in controls:
            lines.append(f"| {name} | {_pct(summarise_mean(c['accuracy']))} | {_signed(c['delta']['mean'])} | "
                         f"{_interval(c['delta']['ci95'])} |")
    lines += ["", "Not tried: " + (", ".join(f"`{t['attack']}` ({t['reason']})" for t in v["not_tried"]) or "none")
              + ". A model is protected only against the attacks that were tried.", ""]
    cmi = report["teacher"].get("cmi") or {}
    if cmi:
        lines += ["Teacher CMI by temperature (" + report["teacher"]["cmi_note"] + "): "
                  + ", ".join(f"T={t}: {val:.4g}" for t, val in cmi.items()), ""]
    else:
        lines += ["Teacher CMI: " + report["teacher"]["cmi_note"], ""]
    lines += [f"Command: `{report.get('command', '')}`", ""]
    return "\n".join(lines)


def _beyond_labels_line(report: dict) -> str | None:
    b = report["verdict"].get("beyond_labels")
    if not b:
        return None
    interval = f", 95% interval {_interval(b['interval'])}" if b.get("interval") else ""
    return (f"Beyond the teacher's labels: the strongest soft-output attack, {b['strongest_attack']}, scores "
            f"{_signed(b['best_delta'])} points against the hard-label student{interval} "
            f"(≤ 0: the soft outputs add nothing to the labels).")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(report: dict) -> dict[str, str]:
    """base64 PNGs: a forest plot of each family's Δ with its one-sided bounds and the margin; the teacher's CMI
    across temperatures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    v = report["verdict"]
    fams = v.get("families") or {}
    if fams:
        names = list(fams)
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.6))
        for i, n in enumerate(names):
            f = fams[n]
            colour = "#c62828" if f["distillable"] else ("#2e7d32" if f["within_margin"] else "#ef6c00")
            if f["lower"] is not None:
                ax.plot([f["lower"], f["upper"]], [i, i], color=colour, lw=2.5)
            ax.plot([f["mean"]], [i], "o", color=colour)
            for x in f["per_seed"]:
                ax.plot([x], [i + 0.18], "|", color="#777", ms=6)
        ax.axvline(0, color="#333", lw=1)
        ax.axvline(v["margin"], color="#c62828", lw=1, ls="--", label=f"margin +{v['margin']:g} points")
        ax.set_yticks(range(len(names)), [n + _config(report["attacks"][n]) for n in names])
        ax.invert_yaxis()
        ax.set_xlabel(f"Δ = knockoff − LS student (points; LS {_ls_accuracy(report)}); "
                      f"bars: one-sided {100 * (1 - v['alpha_per_look']):g}% bounds, ticks: seeds")
        ax.set_title(f"Outcome: {v.get('outcome')}")
        ax.legend(loc="lower right", fontsize=8)
        out["forest"] = _png(fig)
        plt.close(fig)
    cmi = report["teacher"].get("cmi") or {}
    if cmi:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ts = [float(t) for t in cmi]
        ax.plot(ts, list(cmi.values()), "o-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("temperature T")
        ax.set_ylabel("CMI (nats)")
        ax.set_title("Teacher CMI across temperatures")
        out["cmi"] = _png(fig)
        plt.close(fig)
    return out


OUTCOME_COLOURS = {"undistillable": "#2e7d32", "distillable": "#c62828", "inconclusive": "#ef6c00", None: "#555"}


def render_html(report: dict) -> str:
    v = report["verdict"]
    images = plots(report)
    table = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS) + "</tr>"]
    for row in rows(report):
        table.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(row)) + "</tr>")
    table.append("</table>")
    md = render_markdown(report).split("\n")
    facts = "".join(f"<li>{html.escape(line[2:])}</li>" for line in md if line.startswith("- "))
    rule = next((line for line in md if line.startswith("Rule (docs/design.md")), "")
    imgs = "".join(f'<p><img alt="{k}" src="data:image/png;base64,{b}"></p>' for k, b in images.items())
    not_tried = ", ".join(f"{t['attack']} ({t['reason']})" for t in v["not_tried"]) or "none"
    controls = [(n, e["label_control"]) for n, e in report["attacks"].items() if e.get("label_control")]
    if controls:
        table.append("<p>Label-only controls: the same recipe trained on one-hot true labels; gain = attack − "
                     "control, what the teacher's answers add.</p><table><tr><th>recipe</th><th>control accuracy %</th>"
                     "<th>gain (points)</th><th>95% interval</th></tr>")
        for name, c in controls:
            cells = (name, _pct(summarise_mean(c["accuracy"])), _signed(c["delta"]["mean"]), _interval(c["delta"]["ci95"]))
            table.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
        table.append("</table>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Distillation audit</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
.verdict{{color:{OUTCOME_COLOURS.get(v.get('outcome'), '#555')};font-size:1.2em;font-weight:bold}}</style></head><body>
<h1>Distillation audit of {html.escape(report['oracle']['source'])}</h1>
<p class="verdict">{html.escape((v.get('outcome') or 'no verdict').upper())}</p>
<p>{html.escape(v['statement'])}</p>
<p><small>{html.escape(rule)}</small></p>
<p>{html.escape(_beyond_labels_line(report) or "")}</p>
<ul>{facts}</ul>
{''.join(table)}
<p>Not tried: {html.escape(not_tried)}. A model is protected only against the attacks that were tried.</p>
{imgs}
<p>Teacher CMI: {html.escape(report['teacher']['cmi_note'])}</p>
<p><small>schema {report['schema_version']}, created {report['created']}; command
<code>{html.escape(report.get('command', ''))}</code></small></p>
</body></html>
"""


def write_report(report: dict, report_dir: str | Path) -> list[Path]:
    report_dir = Path(report_dir)
    paths = [report_dir / "report.json", report_dir / "report.md", report_dir / "report.html"]
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(render_markdown(report))
    paths[2].write_text(render_html(report))
    return paths


def print_table(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"audit of {report['oracle']['source']} ({report['dataset']}, student {report['student']})")
    for col in HEADERS:
        table.add_column(col, justify="left" if col in ("student", "status") else "right")
    for row in rows(report):
        t = row["test"]
        style = "" if not t else ("red" if t["distillable"] else ("green" if t["within_margin"] else "yellow"))
        table.add_row(*_cells(row), style=style)
    console.print(table)
    q = report["queries"]
    console.print(f"queries: {q['transfer_rows']} transfer rows, {q['asked_this_run']} asked this run, "
                  f"{q['rows_sent_total']} over all sessions")
    v = report["verdict"]
    colour = {"undistillable": "green", "distillable": "red"}.get(v.get("outcome"), "yellow")
    from rich.markup import escape

    console.print(f"[bold {colour}]{escape(v['statement'])}[/]")
    beyond = _beyond_labels_line(report)
    if beyond:
        console.print(beyond)
