"""The ``echochamber`` command: small tools around the library and the results store."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _read(arg: str) -> str:
    if arg == "-":
        return sys.stdin.read()
    path = Path(arg)
    if not path.is_file():
        raise SystemExit(f"echochamber: no such file: {arg}")
    return path.read_text()


def _print_json(obj) -> None:
    print(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj))


def cmd_validate(args) -> int:
    from echochamber import config, grid

    cfg = config.load(*args.config)
    cells = grid.rl_cells(cfg)
    print(f"{' + '.join(args.config)}: valid; {len(grid.pretrain_cells(cfg))} pretrain cells, {len(cells)} RL cells")
    return 0


def cmd_schema(args) -> int:
    from echochamber import config

    text = config.schema_yaml()
    if args.write:
        config.SCHEMA_FILE.write_text(text)
        print(f"wrote {config.SCHEMA_FILE}")
    else:
        print(text, end="")
    return 0


def cmd_sample(args) -> int:
    from echochamber.data import synthetic

    rows = synthetic.generate("sample", args.render, "train", args.n, seed=args.seed,
                              difficulty=synthetic.Difficulty())
    for row in rows:
        print(f"{row['question']}\n\n{row['solution']}\n[answer: {row['answer']}]\n")
    return 0


def cmd_classify(args) -> int:
    from echochamber.formats import classify

    print(classify(_read(args.file)))
    return 0


def cmd_sandbox(args) -> int:
    from echochamber.sandbox import run_snippet

    _print_json(run_snippet(_read(args.file), timeout=args.timeout))
    return 0


def cmd_score(args) -> int:
    from echochamber.reward import score

    _print_json(score(_read(args.file), args.gold))
    return 0


def cmd_sql(args) -> int:
    from echochamber.store import query

    print(query(args.db, args.query, fmt=args.format))
    return 0


def cmd_summary(args) -> int:
    from echochamber.report import summary

    print(summary(args.db))
    return 0


def cmd_findings(args) -> int:
    from echochamber import findings

    db = args.db or findings.default_db(*args.config)
    print(findings.table(findings.judge(db)))
    print(f"machine: {findings.machine_line(db)}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="echochamber", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("validate", help="check a workflow config and count its cells")
    s.add_argument("config", nargs="*", default=["config.yaml"],
                   help="a config, or several merged in order as snakemake --configfile A B merges them")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("schema", help="print the config's JSON schema, generated from echochamber.settings")
    s.add_argument("--write", action="store_true", help="write it to schemas/config.schema.yaml instead")
    s.set_defaults(func=cmd_schema)

    s = sub.add_parser("sample", help="print synthetic problems rendered in one format")
    s.add_argument("--render", default="tinygsm", help="tinygsm, omi1, omi2, gsm8k, prose_corpus, code_corpus")
    s.add_argument("-n", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("classify", help="print the answer format of a completion (tinygsm, omi1, text)")
    s.add_argument("file", nargs="?", default="-", help="a file, or - for standard input")
    s.set_defaults(func=cmd_classify)

    s = sub.add_parser("sandbox", help="run a snippet isolated; print one JSON object")
    s.add_argument("file", nargs="?", default="-", help="a file, or - for standard input")
    s.add_argument("--timeout", type=float, default=3.0)
    s.set_defaults(func=cmd_sandbox)

    s = sub.add_parser("score", help="score a completion against a gold answer; print one JSON object")
    s.add_argument("--gold", required=True, help="the gold answer (a GSM8K solution's '#### N' works too)")
    s.add_argument("file", nargs="?", default="-", help="a file, or - for standard input")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("sql", help="query the results store (read-only)")
    s.add_argument("query", help="SQL text, a saved query's name (winning_format) or a .sql file")
    s.add_argument("--db", default="results/echo.duckdb")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.set_defaults(func=cmd_sql)

    s = sub.add_parser("findings", help="the paper's findings F1-F7 as this grid's store shows them, with verdicts")
    s.add_argument("config", nargs="*", help="the configs the grid ran with, in snakemake --configfile order "
                                             "(their results folder holds the store; default: config.yaml)")
    s.add_argument("--db", default=None, help="the store itself, in place of the configs'")
    s.set_defaults(func=cmd_findings)

    s = sub.add_parser("summary", help="per cell: format shares and pass@1 before and after RL")
    s.add_argument("--db", default="results/echo.duckdb")
    s.set_defaults(func=cmd_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # a user-facing command: one line, not a traceback
        from echochamber.config import ConfigError

        if isinstance(e, (ConfigError, FileNotFoundError, ValueError)):
            print(f"echochamber: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
