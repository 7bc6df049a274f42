"""`audit`: query a model as a black box, train knockoff students with a battery of KD attacks, give a verdict.

  audit run --endpoint http://127.0.0.1:3000 --api-key KEY --dataset fashion-mnist --out reports/fm
  audit run --model models/cmim --dataset digits --attacks kd,vid --seeds 3 --epochs 5 --out reports/d
  audit attacks                 # the battery, one line each
  audit report reports/fm       # re-render report.md / report.html from report.json
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from protect.defaults import UsageError

EXIT_USAGE = 2
EXIT_FAILED = 1

RUN_EPILOG = """\
The transfer set is the dataset's training split (the first --budget rows when given). A fixed slice of it
(--val-fraction) is held out with its labels: every choice (the LS ε, the KD T × α point, calibration, the
early-stopping epoch) is made there, and each attack family's choice alone is evaluated on the test split.
Students train to a validation plateau (one-cycle schedule, best epoch kept) and are paired by seed.

The outcome (docs/design.md §3): distillable iff some family beats the label-smoothing student significantly
(one-sided paired t-test, Holm over the families); undistillable iff every family's one-sided upper bound
is within --margin points; otherwise inconclusive, with the seeds that would decide it (--seeds auto adds
seeds in rounds 3, 5, 8, 12 until decided, splitting --alpha over the looks).

Query strategies (--queries, docs/audit.md): `rows` asks the transfer rows themselves; `mixup` also asks
mixtures λ·x_i + (1−λ)·x_j of two training rows (λ ~ Beta(1, 1)); `boundary` (adaptive) bisects segments
between rows the oracle labels differently, each wave chosen from the previous answers. Each synthetic strategy
asks --query-rounds × the training rows, and --budget counts them all: the real rows are the most that leave
room for them. KD (quick grid) and logit-mse train on every strategy's inputs (`kd@mixup`, ...; epochs capped at
3× a rows student's cost), and so does a label-only LS student (`ls@mixup`: mixed one-hot labels; `ls@boundary`:
the oracle's top-1 labels, what a label-only endpoint gives). The verdict's reference is the best label-only
student on validation; every family's Δ is against it. Validation and test rows are never synthesised.
The default is rows,mixup: against both benchmark teachers mixup held the strongest family (the default CMIM
teacher: logit-mse +0.21 points on rows, +0.52 on mixup inputs; bench/results/protection-queries-*.md). With
--budget 10000 that is 5,263 real rows and 4,737 mixtures; without --budget, every row and one mixture per
training row. `--queries rows` audits the rows alone.

Every row is queried once per audit: answers are cached in OUT/cache as they arrive, so rerunning the same
command after an interruption asks only for the missing rows and retrains only unfinished students.
Every answer is checked before it is cached: a float array of the rows × classes asked, finite, in [0, 1]
and consistent with the output policy /metadata declares; a bad batch stops the audit (exit 1), uncached.
An endpoint that reports no model_sha256 is refused (exit 2) unless --allow-unidentified-model is given.
Exit status: 0 done (whatever the outcome), 1 oracle/report/student failure, 2 bad input, 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    from audit.queries import DEFAULT_QUERIES
    from audit.runner import STUDENT_EPOCHS

    parser = argparse.ArgumentParser(prog="audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="audit a served or exported model", epilog=RUN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    target = r.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", help="base URL of the served model, e.g. http://127.0.0.1:3000")
    target.add_argument("--model", type=Path, help="an exported model directory (model.onnx + model.json), run in-process")
    r.add_argument("--api-key", default=os.environ.get("AUDIT_API_KEY"), help="API key (default: $AUDIT_API_KEY)")
    r.add_argument("--dataset", default="fashion-mnist", help="dataset the transfer and test sets come from")
    r.add_argument("--data-dir", help="where the dataset's files are")
    r.add_argument("--student", default="cnn-tiny", help="student architecture (protect's names or module:factory; "
                                                         "default cnn-tiny, ~25k parameters)")
    r.add_argument("--attacks", default="all", help="all, or comma-separated names (see `audit attacks`); "
                                                    "kd variants like kd-T2-a0.5 may be named directly")
    r.add_argument("--kd-grid", default="full", choices=["full", "quick"],
                   help="kd's candidates: full = T∈{1,2,4,8,16,32} × α∈{0.5,0.9}; quick = T∈{2,4} × α∈{0.5,0.9}")
    r.add_argument("--label-controls", action="store_true",
                   help="also train every soft-output attack's choice on the true labels alone (one-hot 'teacher'), to "
                        "tell a gain that comes from the teacher's answers from one that comes from the recipe")
    r.add_argument("--ls-epsilons", default="0.05,0.1,0.2", help="label-smoothing ε candidates of the reference student")
    r.add_argument("--no-ce-reference", dest="ce_reference", action="store_false",
                   help="skip the plain CE student (reported beside the LS reference, not part of the verdict)")
    r.add_argument("--seeds", default="5", help="paired seeds (0..N-1) per recipe, or 'auto': rounds of 3, 5, 8, 12 "
                                               "seeds until the outcome is decided (default 5)")
    r.add_argument("--max-seeds", type=int, default=12, help="cap for --seeds auto (default 12)")
    r.add_argument("--alpha", type=float, default=0.05, help="test level α (default 0.05; split over --seeds auto's looks)")
    r.add_argument("--margin", type=float, default=0.3,
                   help="practical margin in accuracy points: undistillable needs every upper bound ≤ it (default 0.3)")
    r.add_argument("--epochs", type=int, default=STUDENT_EPOCHS,
                   help=f"epochs per student, one-cycle schedule (default {STUDENT_EPOCHS}: the measured plateau, "
                        "docs/audit.md)")
    r.add_argument("--patience", type=int, default=0,
                   help="stop a student after this many epochs without a better validation accuracy, counted once "
                        "the learning rate has fallen below half its peak; 0 = never (default). The best validation "
                        "epoch is always kept")
    r.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the transfer rows held out (labelled) to make every choice on (default 0.1)")
    r.add_argument("--selection-seeds", type=int, default=1,
                   help="seeds at which every candidate of a family (LS ε, KD T × α) is trained before choosing (default 1)")
    r.add_argument("--jobs", type=int, help="students trained at once in worker processes (default: one per core on a "
                                            "CPU, capped by memory; 1 on a GPU)")
    r.add_argument("--threads", type=int, help="torch threads per job (default: cores ÷ jobs; with --ray, "
                                               "--student-cpus rounded down)")
    r.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="train the students as Ray tasks instead of --jobs processes: alone, on a local cluster "
                        "started for this audit; 'auto' joins the cluster started on this node (`ray start`); or "
                        "the head's host:port. Needs pip install '.[ray]'. Multi-node recipe: docs/audit.md")
    r.add_argument("--student-cpus", type=float, default=1.0, help="with --ray: CPUs each student asks for (default 1)")
    r.add_argument("--student-gpus", type=float, default=0.0,
                   help="with --ray: GPUs each student asks for; a fraction packs several students on one GPU "
                        "(0.25: four at a time). Default 0 (CPU)")
    r.add_argument("--references", type=Path,
                   help="a directory of reference students (LS, CE) shared by audits of the same dataset, transfer "
                        "rows and student recipe: they never see the teacher, so the second audit reuses them "
                        "(run such audits one after another)")
    r.add_argument("--budget", type=int, help="ask at most this many queries in all, real rows (the first ones of "
                                              "the split) and synthetic queries together")
    r.add_argument("--queries", default=DEFAULT_QUERIES,
                   help=f"query strategies, comma-separated: rows (always included), mixup, boundary (adaptive). "
                        f"Default {DEFAULT_QUERIES}; `rows` alone audits the transfer rows only. See the epilog "
                        "and docs/audit.md")
    r.add_argument("--query-rounds", type=int, default=1,
                   help="k: each synthetic strategy asks k × the training rows (default 1)")
    r.add_argument("--lr", type=float, help="student peak learning rate (default 0.2)")
    r.add_argument("--batch-size", type=int, help="student batch size (default per dataset)")
    r.add_argument("--query-batch", type=int, default=1024, help="rows per request to the oracle (default 1024)")
    r.add_argument("--floor", type=float, help="probability floor for log-prob recovery (default: the smallest "
                                               "positive value of the answers' dtype, 1.4e-45 for float32)")
    r.add_argument("--retries", type=int, default=5, help="retries on connection errors, 429 and 503 (default 5)")
    r.add_argument("--max-wait", type=float, default=60.0, help="longest single wait between retries, s (default 60)")
    r.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout per request, s (default 60)")
    r.add_argument("--allow-unidentified-model", action="store_true",
                   help="audit an endpoint whose /metadata reports no model_sha256 (refused by default: a resumed "
                        "audit could not tell its cached answers from another model's)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--out", required=True, type=Path, help="report directory (cache, students, report.*)")
    r.add_argument("--quiet", action="store_true", help="no progress bars or table")

    sub.add_parser("attacks", help="list the attack battery")
    p = sub.add_parser("report", help="re-render report.md and report.html from REPORT_DIR/report.json")
    p.add_argument("report_dir", type=Path)
    p.add_argument("--quiet", action="store_true")
    return parser


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise UsageError(f"{flag}: values must lie in [0, 1), got {text!r}")
    return values


def _redacted_command(argv: list[str]) -> str:
    """The command line for the report, without the API key."""
    out, hide = [], False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
        elif a == "--api-key":
            out.append(a)
            hide = True
        elif a.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(a)
    return "audit " + " ".join(shlex.quote(a) for a in out)


def cmd_run(args: argparse.Namespace) -> int:
    from audit.oracle import HttpOracle, OnnxOracle
    from audit.report import print_table
    from audit.runner import AuditSettings, run_audit

    if args.query_batch < 1 or args.retries < 0 or (args.floor is not None and not 0 < args.floor < 1):
        raise UsageError("--query-batch must be ≥ 1, --retries ≥ 0 and --floor in (0, 1)")
    if args.jobs is not None and args.jobs < 1 or args.threads is not None and args.threads < 1:
        raise UsageError("--jobs and --threads must be ≥ 1")
    ray = None
    if args.ray is not None:
        from audit.ray_jobs import RayOptions, check_options

        if args.jobs is not None:
            raise UsageError("--jobs sets worker processes on this machine; with --ray, --student-cpus and "
                             "--student-gpus set what each student asks of the cluster")
        ray = RayOptions(args.ray or None, args.student_cpus, args.student_gpus)
        if problem := check_options(ray, args.device):
            raise UsageError(problem)
    seeds: int | str = args.seeds.strip().lower()
    if seeds != "auto":
        try:
            seeds = int(seeds)
        except ValueError:
            raise UsageError(f"--seeds: a number of paired seeds or 'auto', got {args.seeds!r}") from None
    settings = AuditSettings(
        dataset=args.dataset, student=args.student, out=args.out, attacks=args.attacks, seeds=seeds,
        max_seeds=args.max_seeds, epochs=args.epochs, patience=args.patience or None, val_fraction=args.val_fraction,
        selection_seeds=args.selection_seeds, budget=args.budget, kd_grid=args.kd_grid, queries=args.queries,
        query_rounds=args.query_rounds,
        label_controls=args.label_controls, ls_epsilons=_floats(args.ls_epsilons, "--ls-epsilons"),
        ce_reference=args.ce_reference,
        data_dir=args.data_dir, lr=args.lr, batch_size=args.batch_size, query_batch=args.query_batch,
        floor=args.floor, device=args.device, jobs=args.jobs, threads=args.threads, ray=ray, alpha=args.alpha,
        margin=args.margin, references=args.references, progress=not args.quiet,
        command=_redacted_command(args.argv), allow_unidentified_model=args.allow_unidentified_model)
    if args.endpoint:
        oracle = HttpOracle(args.endpoint, args.api_key, timeout=args.timeout, retries=args.retries,
                            max_wait=args.max_wait)
    else:
        oracle = OnnxOracle(args.model)
    try:
        report = run_audit(settings, oracle)
    finally:
        oracle.close()
    if not args.quiet:
        print_table(report)
        print(f"report: {args.out / 'report.html'} (also report.md, report.json)")
    else:
        print(report["verdict"]["statement"])
    return 130 if not report["complete"] else 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from audit.attacks import ATTACKS, BATTERY, LS_EPSILONS

    width = max(len(n) for n in BATTERY)
    for name in BATTERY:
        print(f"{name:<{width}}  {ATTACKS.get(name).summary}")
    print(f"{'references':<{width}}  label smoothing ε ∈ {{{', '.join(f'{e:g}' for e in LS_EPSILONS)}}} (chosen on "
          "validation; the reference for Δ) and a plain CE student")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from audit.report import load_report, print_table, write_report

    report = load_report(args.report_dir)
    paths = write_report(report, args.report_dir)
    if not args.quiet:
        print_table(report)
    print(f"report: {paths[2]} (also {paths[1].name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from protect.card import ModelDirError
    from protect.data import DatasetNotFoundError
    from protect.registry import UnknownNameError
    from protect.trainer import NonFiniteLossError

    from audit.cache import CacheMismatchError
    from audit.oracle import OracleError, OracleMismatchError
    from audit.recover import AnswersNotProbabilitiesError
    from audit.report import ReportError
    from audit.runner import AuditUsageError
    from audit.students import StudentFailedError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handlers = {"run": cmd_run, "attacks": cmd_attacks, "report": cmd_report}
    prefix = f"audit {args.command}: error:"
    try:
        return handlers[args.command](args)
    except (UnknownNameError, UsageError, AuditUsageError, DatasetNotFoundError, OracleMismatchError,
            CacheMismatchError, AnswersNotProbabilitiesError) as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OracleError, ModelDirError, ReportError, NonFiniteLossError, StudentFailedError) as exc:
        out = getattr(args, "out", None)
        kept = f" Answers received so far are kept in {out}/cache; rerun the same command to continue." \
            if out and (Path(out) / "cache").exists() else ""
        print(f"{prefix} {exc}{kept}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("audit: interrupted; answers and finished students are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
