"""The protection experiment's view of the audit's query strategies (audit/queries): one table per results file."""
from __future__ import annotations

from experiments.tables import cell


def strategy_table(rows: dict[str, dict]) -> list[str]:
    """Markdown lines, per query strategy: the strongest family on its inputs (Δ, upper bound), then the verdict's
    label-only reference and calibrated-kd's fitted τ, per teacher. Nothing for an audit of the rows alone."""
    strategies = list(dict.fromkeys(f.get("queries", "rows") for row in rows.values()
                                    for f in row["audit"]["families"].values()))
    if strategies == ["rows"]:
        return []
    lines = ["", "## Strongest family per query strategy (Δ against the label-only reference, points; one-sided "
             "95% upper bound; ✱ = significant after Holm)", "", "| strategy | " + " | ".join(rows) + " |",
             "|---" * (len(rows) + 1) + "|"]
    for s in strategies:
        cells = []
        for row in rows.values():
            fams = {n: f for n, f in row["audit"]["families"].items() if f.get("queries", "rows") == s}
            best = max(fams, key=lambda n: fams[n]["mean"], default=None)
            cells.append(f"{best}: {cell(fams[best])}" if best else "–")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    refs = []
    for row in rows.values():
        r = row["audit"].get("reference") or {}
        lead = f" (+{r['lead_on_validation']:.2f} on validation)" if r.get("lead_on_validation") is not None else ""
        refs.append(f"{r.get('family', 'ls')}{lead}")
    lines.append("| reference | " + " | ".join(refs) + " |")
    taus = []
    for row in rows.values():
        t = (row["audit"]["families"].get("calibrated-kd") or {}).get("fitted_tau")
        value = None if not t else (t["tau"] if isinstance(t["tau"], float) else min(t["tau"]))
        taus.append("–" if not t else f"{value:.4g}" + (f" ({t['at_bound']} bound)" if t["at_bound"] else ""))
    return lines + ["| calibrated-kd τ | " + " | ".join(taus) + " |"]
