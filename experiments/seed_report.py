"""The protection-over-seeds experiment's conclusions: the MCMI teacher's KD student against the CE teacher's
(paired by student seed), the targets and the markdown of the results file."""
from __future__ import annotations

from audit.stats import decide, paired_delta

CMIM_DROP_MAX_POINTS = 0.3
NOT_YET = "not yet measured"


def paired_kd(mcmi: list[float], ce: list[float]) -> dict:
    """MCMI − CE in points over the seeds both have (the same student seeds, paired), with audit.stats' paired
    test: mean, one-sided 95% bounds (`lower`: MCMI's student is better when > 0; `upper`), the two-sided 95%
    interval, and the p-values of the one-sided (MCMI > CE) and two-sided paired t-tests."""
    n = min(len(mcmi), len(ce))
    d = paired_delta([float(x) for x in mcmi[:n]], [float(x) for x in ce[:n]])
    out = {"seeds": n, "mean": d["mean"], "std": d["std"], "per_seed": d["per_seed"], "ci95": d["ci95"],
           "lower": None, "upper": None, "p_greater": None, "p_two_sided": None}
    if n >= 2:
        f = decide({"mcmi-ce": d["per_seed"]}).families["mcmi-ce"]
        out.update(lower=f.lower, upper=f.upper, p_greater=f.p_value,
                   p_two_sided=min(1.0, 2 * min(f.p_value, 1 - f.p_value)))
    return out


def mcmi_vs_ce_kd(teachers: dict[str, dict]) -> dict | str:
    """The comparison from the `mcmi` and `ce` entries: their KD students' per-seed accuracies, or, for entries
    imported without them, the KD Δ per seed where both were measured against the same teacher-independent
    reference students (a reference on the rows: Δ_mcmi − Δ_ce is then acc_mcmi − acc_ce). A string says why not."""
    ce, mcmi = teachers.get("ce"), teachers.get("mcmi")
    if ce is None or mcmi is None:
        return NOT_YET
    if ce.get("kd_student_accuracy") and mcmi.get("kd_student_accuracy"):
        out = paired_kd([100 * x for x in mcmi["kd_student_accuracy"]], [100 * x for x in ce["kd_student_accuracy"]])
        return {**out, "from": "the KD students' test accuracies"}
    same = ce["reference"]["name"] == mcmi["reference"]["name"] and "@" not in ce["reference"]["name"]
    if same and ce.get("kd_delta_per_seed") and mcmi.get("kd_delta_per_seed"):
        out = paired_kd(mcmi["kd_delta_per_seed"], ce["kd_delta_per_seed"])
        return {**out, "from": f"the KD Δ against the shared {ce['reference']['name']} students"}
    return "the KD students' per-seed accuracies are not in an imported row (a KD-only audit of it gives them)"


def by_row(result: dict) -> dict[str, dict]:
    return {e["row"]: e for e in result["teachers"]}


def evaluate_targets(result: dict) -> list[dict]:
    """Each CMIM teacher undistillable, the CE teacher distillable, mean CMIM accuracy ≥ mean CE − 0.3 points."""
    out = []
    for row in result["asked_rows"]:
        mode = row.partition("@")[0]
        if mode not in ("ce", "cmim"):
            continue
        want = "undistillable" if mode == "cmim" else "distillable"
        e = by_row(result).get(row)
        measured = NOT_YET if e is None else (f"{e['outcome']} (largest upper bound {e['largest_upper']:+.2f}, "
                                              f"{e['seeds']} seeds)" if e["largest_upper"] is not None else e["outcome"])
        out.append({"target": f"{row} {want}", "measured": measured,
                    "reached": None if e is None else e["outcome"] == want})
    acc = result["accuracy_over_teacher_seeds"]
    ce, cmim = acc.get("ce"), acc.get("cmim")
    if ce is not None and cmim is not None:
        done = ce["mean"] is not None and cmim["mean"] is not None and not any(
            m.startswith("accuracy_over_teacher_seeds") for m in result["missing_parts"])
        drop = 100 * (ce["mean"] - cmim["mean"]) if done else None
        out.append({"target": f"mean CMIM accuracy ≥ mean CE − {CMIM_DROP_MAX_POINTS} points",
                    "measured": NOT_YET if drop is None else f"CE − CMIM = {drop:+.2f} points over seeds "
                                                             f"{','.join(map(str, ce['seeds']))}",
                    "reached": None if drop is None else drop <= CMIM_DROP_MAX_POINTS})
    return out


def kd_claim(k: dict) -> str:
    """What the paired comparison says of the claim that an MCMI teacher's KD student is the more accurate."""
    if k["lower"] is not None and k["lower"] > 0:
        return "MCMI's KD student is more accurate: the claim is confirmed."
    if k["upper"] is not None and k["upper"] < 0:
        return "MCMI's KD student is less accurate: the claim is refuted."
    return "Neither confirmed nor refuted at these seeds."


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def strongest_per_strategy(result: dict) -> list[str]:
    """Per row and query strategy (the rows, each off-manifold one): the strongest family, its Δ and upper bound."""
    entries = result["teachers"]
    strategies = list(dict.fromkeys(f["queries"] for e in entries for f in e["families"].values()))
    if not entries:
        return []
    lines = ["", "## Strongest family per query strategy (Δ, ≤ one-sided 95% upper bound, points)", "",
             "| row | " + " | ".join(strategies) + " |", "|---" * (len(strategies) + 1) + "|"]
    for e in entries:
        cells = []
        for q in strategies:
            fams = {n: f for n, f in e["families"].items() if f["queries"] == q and f["mean"] is not None}
            best = max(fams, key=lambda n: fams[n]["mean"], default=None)
            up = "" if best is None or fams[best]["upper"] is None else f" (≤ {fams[best]['upper']:+.2f})"
            cells.append("–" if best is None else f"{best} {fams[best]['mean']:+.2f}{up}")
        lines.append(f"| {e['row']} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Protection over teacher seeds: {s['dataset']}", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}  ", f"Date: {result['date']}", "",
             "**Partial**: missing " + "; ".join(result["missing_rows"] + result["missing_parts"]) + "."
             if result["partial"] else "Complete: every row and part is in.", "",
             f"Audit `{s['audit']}`: {s['seeds']} paired student seeds"
             f"{' (`--seeds auto` where that is inconclusive)' if s.get('reaudit', True) else ''}, "
             f"query strategies `{s['queries']['strategies']}` within {s['queries']['budget']} queries; "
             f"calibrated-kd's τ is fitted in [{s['tau_bounds'][0]:g}, {s['tau_bounds'][1]:g}]. Δ in points against "
             "the label-only reference; accuracies in %.", "",
             "| row | recipe | teacher seed | test acc | outcome | seeds | strongest | largest upper bound | reference "
             "(acc) | calibrated-kd τ | source |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["asked_rows"]:
        e = by_row(result).get(row)
        if e is None:
            lines.append(f"| {row} | – | – | – | {NOT_YET} | – | – | – | – | – | – |")
            continue
        up = "–" if e["largest_upper"] is None else f"{e['largest_upper']:+.2f}"
        tau = "–" if e["calibrated_kd_tau"] is None else f"{e['calibrated_kd_tau']:.4g}"
        lines.append(f"| {row} | `{e['recipe']}` ({e['recipe_sha256'][:12]}) | {e['seed']} | "
                     f"{_pct(e['test_accuracy'])} | **{e['outcome']}** | {e['seeds']} | {e['strongest']} | {up} | "
                     f"{e['reference']['name']} ({_pct(e['reference']['accuracy'])}) | {tau} | {e['source']} |")
    lines += strongest_per_strategy(result)
    lines += ["", "## Accuracy over teacher seeds (last-epoch test accuracy, %)", ""]
    for mode, a in result["accuracy_over_teacher_seeds"].items():
        per = ", ".join(f"{k}: {_pct(v)}" for k, v in a["per_seed"].items()) or NOT_YET
        lines.append(f"- **{mode}** (`{a['recipe']}`): mean {_pct(a['mean'])} over seeds "
                     f"{a['seeds'] or '–'} ({per})")
    k = result["mcmi_vs_ce_kd"]
    lines += ["", "## MCMI teacher's KD student − CE teacher's KD student (points, paired student seeds)", ""]
    if isinstance(k, dict):
        lo = "–" if k["lower"] is None else f"{k['lower']:+.2f}"
        up = "–" if k["upper"] is None else f"{k['upper']:+.2f}"
        p = "–" if k["p_greater"] is None else f"{k['p_greater']:.3g}"
        lines.append(f"Mean {k['mean']:+.2f} over {k['seeds']} seeds; one-sided 95% bounds ≥ {lo} and ≤ {up}; "
                     f"p (MCMI > CE) {p} (from {k['from']}). {kd_claim(k)}")
    else:
        lines.append(k or "not asked (needs the ce and mcmi rows)")
    lines += ["", "## Targets", "", "| target | measured | reached |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {NOT_YET if t['reached'] is None else 'yes' if t['reached'] else 'no'} |"
              for t in result["targets"]]
    return "\n".join(lines) + "\n"
