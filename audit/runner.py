"""An audit, start to finish (docs/design.md §3): check the settings (`audit.settings`), ask the oracle for its
answers on the transfer set and any synthetic queries (`audit.querying`), train the students look by look with
choices made on a validation slice (`audit.execution`, `audit.plan`), and build the report (`audit.reporting`);
`audit.stats` decides, `audit.report` renders."""
from __future__ import annotations

from audit.attacks import expand_attacks, reference_variants
from audit.execution import build_plan, run_looks, student_data
from audit.oracle import Oracle
from audit.queries import parse_queries
from audit.queries.families import strategy_variants
from audit.querying import ask, transfer_set, validation_split
from audit.reporting import build_report
from audit.settings import STUDENT_EPOCHS, AuditSettings, AuditUsageError, check_settings

# The names callers import from here (the CLI, the benchmarks, the tests), wherever they now live.
__all__ = ["AuditSettings", "AuditUsageError", "STUDENT_EPOCHS", "run_audit", "student_data", "validation_split"]


def run_audit(settings: AuditSettings, oracle: Oracle) -> dict:
    """Run (or resume) the audit into `settings.out`; returns the report dict, also written there as
    report.json, report.md and report.html."""
    # Everything that can be refused is checked before the first query.
    check_settings(settings)
    strategies = parse_queries(settings.queries)
    variants = expand_attacks(settings.attacks, settings.kd_grid)
    references = reference_variants(settings.ls_epsilons, ce=settings.ce_reference)
    on_queries, query_references = strategy_variants(variants, strategies, settings.ls_epsilons)
    variants, references = variants + on_queries, references + query_references
    splits = transfer_set(settings, strategies)

    answers = ask(settings, oracle, splits, strategies)
    runnable = [v for v in variants if not (v.needs_soft and answers.recovery.label_only)]
    not_run = {v.family: "the endpoint answers labels only; this attack needs soft outputs"
               for v in variants if v not in runnable}

    data = student_data(answers.splits, answers.recovery.logp, settings)
    data.queries = answers.query_tensors
    plan = build_plan(settings, answers, references, runnable, len(data.train_y))
    outcome = run_looks(settings, plan, data)

    report = build_report(settings, answers, plan, outcome, not_run=not_run, tried={v.family for v in variants},
                          train_rows=len(data.train_y), val_rows=len(data.val_y))
    from audit.report import write_report

    write_report(report, settings.out)  # report.json, report.md, report.html
    return report
