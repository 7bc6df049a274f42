"""What the report says about query strategies: the queries each one asked and how the budget was split, the
verdict's label-only reference (which won, by how much), each family's strategy and cost, and calibrated-kd's
fitted τ (with a flag when it sits on a bound of `protect.metrics.TAU_BOUNDS`)."""
from __future__ import annotations

from audit.queries.reference import reference_summary

BUDGET_RULE = ("--budget counts every query: each synthetic strategy asks --query-rounds × the training rows "
               "(the rows outside the validation slice), and the real rows are the most that leave room for them")


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def query_lines(report: dict) -> list[str]:
    """Bullet lines on the query strategies, the verdict's reference and calibrated-kd's τ (when there are any)."""
    q, lines = report["queries"], []
    for name, e in (q.get("strategies") or {}).items():
        if name != "rows":
            lines.append(f"- queries `{name}`{' (adaptive)' if e['adaptive'] else ''}: {e['queries']} synthetic "
                         f"inputs ({e['summary']}); asked this run {e['asked_this_run']}, cached before "
                         f"{e['cached_before_this_run']}; its students train {e['epochs']} epochs over "
                         f"{e['rows_per_epoch']} rows; label-only counterpart: {e['reference']}")
    b = q.get("budget")
    if b and b["synthetic"]:
        lines.append(f"- budget {b['budget'] if b['budget'] is not None else 'none'}: {b['rows']} real rows + "
                     f"{b['synthetic']} synthetic = {b['total']} queries ({b['rule']})")
    r = report["verdict"].get("reference")
    if r and len(r["validation_accuracy"]) > 1:
        lead = "–" if r["lead_on_validation"] is None else f"{r['lead_on_validation']:+.2f}"
        scores = ", ".join(f"{n} {_pct(s)}" for n, s in r["validation_accuracy"].items())
        test = "–" if r["test_delta_vs_ls"] is None else f"{r['test_delta_vs_ls']:+.2f}"
        lines.append(f"- label-only reference: `{r['family']}` won on validation ({scores}; lead {lead} points), "
                     f"test Δ against `ls` {test} points; every family's Δ is against it")
    for name, e in report["attacks"].items():
        tau = e.get("fitted_tau")
        if tau:
            where = f", on its {tau['at_bound']} bound: the fit is clamped" if tau["at_bound"] else ""
            value = tau["tau"] if isinstance(tau["tau"], float) else min(tau["tau"])
            lines.append(f"- `{name}` fitted τ = {value:.4g} (searched in [{tau['bounds'][0]:g}, "
                         f"{tau['bounds'][1]:g}]{where})")
    return lines


def family_cost(plan, name: str, seeds: int, rows_per_epoch: int) -> dict:
    """Students trained, their seconds, and the rows they passed over (Σ epochs run × rows per epoch)."""
    records = plan.students(name, seeds)
    return {"students": len(records), "seconds": round(sum(r.get("seconds", 0.0) for r in records), 3),
            "rows_per_epoch": rows_per_epoch, "row_epochs": sum(r.get("epochs_run", 0) for r in records) * rows_per_epoch}


def fitted_tau(plan, name: str, seeds: int) -> dict | None:
    """calibrated-kd's τ as its students recorded it, with the search range and whether it landed on a bound."""
    from protect.metrics import TAU_BOUNDS, at_tau_bound

    taus = sorted({r["options"]["calibration_temperature"] for r in plan.students(name, seeds)
                   if "calibration_temperature" in (r.get("options") or {})})
    if not taus:
        return None
    bounds = tuple(plan.families[name].candidates[0].options.get("tau_bounds", TAU_BOUNDS))
    bound = at_tau_bound(taus[0], bounds) or at_tau_bound(taus[-1], bounds)
    return {"tau": taus[0] if len(taus) == 1 else taus, "bounds": list(bounds), "at_bound": bound}


def add_query_fields(report: dict, plan, seeds: int, entries: dict, budget: int | None) -> None:
    from audit.report import describe_verdict

    q = report["queries"]
    rows = q["transfer_rows"]
    n_train = report["training"]["train_rows"]
    synthetic = sum(e["queries"] for e in entries.values())
    q["strategies"] = {"rows": {"queries": rows, "asked_this_run": q["asked_this_run"],
                                "cached_before_this_run": q["cached_before_this_run"]},
                       **{n: {k: v for k, v in e.items() if k != "fingerprint"} for n, e in entries.items()}}
    q["budget"] = {"budget": budget, "rows": rows, "synthetic": synthetic, "total": rows + synthetic,
                   "rule": BUDGET_RULE}
    q["asked_this_run_all"] = q["asked_this_run"] + sum(e["asked_this_run"] for e in entries.values())
    for section in ("references", "attacks"):
        for name, entry in report[section].items():
            fam = plan.families.get(name)
            if fam is None:
                continue
            strategy = fam.candidates[0].queries
            entry["queries"] = strategy
            per_epoch = n_train + (entries[strategy]["queries"] if strategy in entries else 0)
            entry["cost"] = family_cost(plan, name, seeds, per_epoch)
            if fam.candidates[0].attack == "calibrated-kd":
                entry["fitted_tau"] = fitted_tau(plan, name, seeds)
    report["verdict"]["reference"] = reference_summary(plan, seeds)
    report["verdict"]["statement"] = describe_verdict(report)
