"""Markdown cells and tables shared by the experiments' results files."""
from __future__ import annotations


def cell(f: dict | None) -> str:
    """A family's Δ with its upper bound, ✱ when significantly above 0."""
    if not f:
        return "–"
    mark = " ✱" if f["distillable"] else ""
    return f"{f['mean']:+.2f} (≤ {f['upper']:+.2f}){mark}" if f["upper"] is not None else f"{f['mean']:+.2f}"


def audit_cells(a: dict) -> tuple[str, str, str]:
    """(LS student accuracy %, largest upper bound, strongest family with its Δ) of an audit summary, as cells."""
    ls = f"{100 * a['ls_student_accuracy']:.2f}" if a["ls_student_accuracy"] is not None else "–"
    up = f"{a['largest_upper']:+.2f}" if a["largest_upper"] is not None else "–"
    best = f"{a['strongest_attack']} ({a['best_delta']:+.2f})" if a["best_delta"] is not None else "–"
    return ls, up, best


def trained_line(rows: dict[str, dict]) -> list[str]:
    trained = {row["teacher"].get("trained_on", "unknown") for row in rows.values()}
    return ["", "Teachers trained on: " + "; ".join(sorted(trained)) + "."]


def recipe_line(rows: dict[str, dict]) -> list[str]:
    """Each row's recipe file and the hash its run recorded (rows written before runs recorded one: none)."""
    parts = [f"{n}: `{r['recipe']['name']}` ({r['recipe']['sha256'][:12]})" for n, r in rows.items() if r.get("recipe")]
    return ["", "Recipes (recipes/teachers/NAME.toml, sha256 of the run's settings): " + "; ".join(parts) + "."] \
        if parts else []


def family_table(rows: dict[str, dict]) -> list[str]:
    """Markdown lines: every family's Δ and upper bound per row, and KD's choice on validation."""
    names = list(dict.fromkeys(f for row in rows.values() for f in row["audit"]["families"]))
    lines = ["", "## Δ per attack family (points: mean over seeds, one-sided 95% upper bound; ✱ = significantly "
             "above 0 after Holm; the KD point chosen on validation in the last row)", "",
             "| family | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(cell(row["audit"]["families"].get(n)) for row in rows.values()) + " |")
    kd = [row["audit"]["families"].get("kd", {}).get("selected") or "–" for row in rows.values()]
    return lines + ["| kd choice | " + " | ".join(kd) + " |"]
