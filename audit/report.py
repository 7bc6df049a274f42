"""report.json → report.md, report.html (plots embedded as base64 PNG) and a rich table on the console."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from audit import REPORT_SCHEMA_VERSION


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


def _interval(ci) -> str:
    return "–" if not ci else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def rows(report: dict) -> list[dict]:
    """One row per student recipe, references first, for the tables."""
    out = []
    refs = report["references"]
    ls = refs["ls"]
    if ls.get("summary"):
        out.append({"name": f"LS (ε={ls['best_epsilon']:g}, reference)", "acc": ls["summary"], "delta": None,
                    "status": "reference"})
    if refs["ce"].get("summary"):
        out.append({"name": "CE (labels only)", "acc": refs["ce"]["summary"], "delta": refs["ce"]["delta_vs_ls"],
                    "status": "reference"})
    for name, e in report["attacks"].items():
        out.append({"name": name, "acc": e.get("summary"), "delta": e.get("delta"), "status": e["status"],
                    "reason": e.get("reason")})
    return out


def _cells(row: dict, with_std: bool = True) -> tuple[str, str, str, str, str]:
    """(student, accuracy, Δ, interval, status) as text for one table row."""
    acc, d = row["acc"], row["delta"]
    std = lambda s: _pct(s["std"]) if s["std"] is not None else "–"  # noqa: E731
    acc_s = "–" if not acc else f"{_pct(acc['mean'])} ± {std(acc)}"
    d_s = "–" if not d else (f"{_signed(d['mean'])} ± {std(d)}" if with_std else _signed(d["mean"]))
    status = row["status"] + (f" ({row['reason']})" if row.get("reason") else "")
    return row["name"], acc_s, d_s, _interval(d["ci95"]) if d else "–", status


def _verdict_line(report: dict) -> str:
    return report["verdict"]["statement"]


def _beyond_labels_line(report: dict) -> str | None:
    b = report["verdict"].get("beyond_labels")
    if not b:
        return None
    interval = f", 95% interval {_interval(b['interval'])}" if b.get("interval") else ""
    return (f"Beyond the teacher's labels: the strongest soft-output attack, {b['strongest_attack']}, scores "
            f"{_signed(b['best_delta'])} points against the hard-label student{interval} "
            f"(≤ 0: the soft outputs add nothing to the labels).")


def render_markdown(report: dict) -> str:
    v, q, r = report["verdict"], report["queries"], report["recovery"]
    lines = [f"# Distillation audit: {report['oracle']['source']}", "", f"**{_verdict_line(report)}**", ""]
    if v.get("interval"):
        lines += [f"Strongest attack: `{v['strongest_attack']}`, Δ = {_signed(v['best_delta'])} points, "
                  f"95% interval {_interval(v['interval'])}.", ""]
    beyond = _beyond_labels_line(report)
    if beyond:
        lines += [beyond, ""]
    lines += [
        f"- model sha256 `{report['oracle']['model_sha256'][:16]}…`, mode `{report['oracle'].get('mode')}`, "
        f"output policy `{json.dumps(report['oracle']['output_policy'])}`",
        f"- dataset `{report['dataset']}`, student `{report['student']}`, {report['training']['epochs']} epochs, "
        f"seeds {report['training']['seeds']}, kd grid `{report['training']['kd_grid']}`",
        f"- queries: {q['transfer_rows']} transfer rows; asked this run {q['asked_this_run']}, cached before "
        f"{q['cached_before_this_run']}; rows sent over all sessions {q['rows_sent_total']} in "
        f"{q['requests_total']} requests",
        f"- log-prob recovery: floor {r['floor']:g}, {r['clamped_entries']} of {r['entries']} entries clamped "
        f"({r['clamped_rows']} rows); label-only: {r['label_only']}",
        f"- teacher agreement with the transfer labels: {_pct(report['teacher']['transfer_agreement'])}%",
        "",
        "| student | accuracy % (mean ± std) | Δ vs LS (points) | 95% interval | status |",
        "|---|---|---|---|---|",
    ]
    for row in rows(report):
        lines.append("| " + " | ".join(_cells(row)) + " |")
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


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(report: dict) -> dict[str, str]:
    """base64 PNGs: knockoff accuracy per attack against the LS line; the teacher's CMI across temperatures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    names, means, errs = [], [], []
    for name, e in report["attacks"].items():
        if e.get("summary"):
            names.append(name)
            means.append(100 * e["summary"]["mean"])
            errs.append(100 * (e["summary"]["std"] or 0.0))
    ls = report["references"]["ls"].get("summary")
    if names:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
        ax.bar(range(len(names)), means, yerr=errs, capsize=3, color="#4c72b0")
        if ls:
            ax.axhline(100 * ls["mean"], color="#c44e52", lw=1.5,
                       label=f"LS reference ({100 * ls['mean']:.2f}%)")
            if ls.get("std"):
                ax.axhspan(100 * (ls["mean"] - ls["std"]), 100 * (ls["mean"] + ls["std"]), color="#c44e52", alpha=0.15)
            ax.legend(loc="lower right")
        lo = min(means + ([100 * ls["mean"]] if ls else [])) - max(errs + [1.0]) - 1
        ax.set_ylim(max(0, lo), min(100, max(means) + max(errs + [0.0]) + 1))
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
        ax.set_ylabel("knockoff test accuracy (%)")
        ax.set_title("Knockoff students vs the label-smoothing student (mean ± std over seeds)")
        out["accuracy"] = _png(fig)
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


def render_html(report: dict) -> str:
    v = report["verdict"]
    images = plots(report)
    colour = {True: "#2e7d32", False: "#c62828", None: "#555"}[v["undistillable"]]
    table = ["<table><tr><th>student</th><th>accuracy % (mean ± std)</th><th>Δ vs LS (points)</th>"
             "<th>95% interval</th><th>status</th></tr>"]
    for row in rows(report):
        table.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(row)) + "</tr>")
    table.append("</table>")
    md = render_markdown(report).split("\n")
    facts = "".join(f"<li>{html.escape(line[2:])}</li>" for line in md if line.startswith("- "))
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
.verdict{{color:{colour};font-size:1.2em;font-weight:bold}}</style></head><body>
<h1>Distillation audit of {html.escape(report['oracle']['source'])}</h1>
<p class="verdict">{html.escape(_verdict_line(report))}</p>
<p>Strongest attack: {html.escape(str(v['strongest_attack']))}; Δ = {_signed(v['best_delta'])} points,
95% interval {_interval(v['interval'])}.</p>
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
    for col in ("student", "acc % (mean ± std)", "Δ vs LS", "95% interval", "status"):
        table.add_column(col, justify="left" if col in ("student", "status") else "right")
    for row in rows(report):
        d = row["delta"]
        style = "" if not d else ("red" if d["mean"] > 0 else "green")
        table.add_row(*_cells(row, with_std=False), style=style)
    console.print(table)
    q = report["queries"]
    console.print(f"queries: {q['transfer_rows']} transfer rows, {q['asked_this_run']} asked this run, "
                  f"{q['rows_sent_total']} over all sessions")
    v = report["verdict"]
    colour = {True: "green", False: "red", None: "yellow"}[v["undistillable"]]
    console.print(f"[bold {colour}]{_verdict_line(report)}[/]")
    beyond = _beyond_labels_line(report)
    if beyond:
        console.print(beyond)
