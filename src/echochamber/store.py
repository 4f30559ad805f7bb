"""The results store: one DuckDB file built from the per-cell parquet files, and read-only queries.

``build`` is the only writer (rule ``ingest``). It builds the whole database in a temporary sibling file
and renames it into place, so a reader never sees a half-built store and a killed ingest leaves the
previous one intact; a connection held open on the old file keeps reading the old, complete data.

Every table carries the cell coordinates as typed columns, read from the hive-style paths
(``mixture=M/scale=Z/algo=A/kl=B/seed=K``): ``mixture``, ``scale``, ``algo`` VARCHAR, ``kl`` DOUBLE,
``seed`` INTEGER, plus ``benchmark`` and ``step`` INTEGER where they apply. Pretraining rows are the
``algo='base'``, ``kl=0`` cell, as are the base model's evaluations (step 0).

Table ``machines`` holds one row per cell whose job recorded where it ran (``<cell>/machine.json``,
echochamber.machine): the coordinates and the machine's fields; ``meta`` key ``machine`` sums them up in one
line. Cells without the file get no row.

``query`` opens the store read-only and returns a text table, CSV or JSON; saved queries live in
``queries/*.sql`` and can be named instead of written out.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from echochamber import machine
from echochamber.formats import FORMATS as ANSWER_FORMATS
from echochamber.io import atomic_path, unreadable

QUERIES_DIR = Path(__file__).resolve().parents[2] / "queries"

COORDS = {"mixture": "VARCHAR", "scale": "VARCHAR", "algo": "VARCHAR", "kl": "DOUBLE", "seed": "INTEGER"}
BASE_ALGO = "base"
OUTPUT_FORMATS = ("table", "csv", "json")   # how `echochamber sql` prints (not answer formats)


class StoreError(ValueError):
    """A user-facing problem with the store or its inputs; the message is one sentence naming the file."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    file: str                      # the per-cell file name that feeds this table
    path_keys: tuple[str, ...]     # coordinates read from the path (beyond COORDS)
    columns: dict[str, str]        # documented value columns: every file must hold them


_SHARES = {f"share_{f}": "DOUBLE" for f in ANSWER_FORMATS}
_ACCS = {f"acc_{f}": "DOUBLE" for f in ANSWER_FORMATS}

TABLES = (
    TableSpec("pretrain_curves", "curve.parquet", (), {
        "step": "INTEGER", "tokens": "BIGINT", "loss": "DOUBLE", "lr": "DOUBLE", "grad_norm": "DOUBLE",
        "tokens_per_s": "DOUBLE"}),
    TableSpec("rl_steps", "steps.parquet", (), {
        "step": "INTEGER", "episode": "DOUBLE", "reward": "DOUBLE", **_SHARES, **_ACCS, "kl_div": "DOUBLE",
        "entropy": "DOUBLE", "clip_frac": "DOUBLE", "approx_kl": "DOUBLE", "value_loss": "DOUBLE",
        "response_len": "DOUBLE", "trunc_rate": "DOUBLE", "tokens_per_s": "DOUBLE"}),
    TableSpec("samples", "samples.parquet", (), {
        "step": "INTEGER", "prompt": "VARCHAR", "completion": "VARCHAR", "format": "VARCHAR",
        "correct": "BOOLEAN", "answer": "VARCHAR", "error": "VARCHAR"}),
    TableSpec("evals", "metrics.parquet", ("benchmark",), {
        "step": "INTEGER", "n_problems": "INTEGER", "n_samples": "INTEGER", "k": "INTEGER",
        "temperature": "DOUBLE", "top_p": "DOUBLE", "pass1": "DOUBLE", "pass_k": "DOUBLE", "maj_k": "DOUBLE",
        "mean_acc": "DOUBLE", **_SHARES, **_ACCS, "unparsable_rate": "DOUBLE", "response_len": "DOUBLE",
        "trunc_rate": "DOUBLE"}),
    TableSpec("generations", "generations.parquet", ("benchmark",), {
        "step": "INTEGER", "problem_id": "VARCHAR", "kind": "VARCHAR", "sample": "INTEGER",
        "question": "VARCHAR", "gold": "VARCHAR", "completion": "VARCHAR", "format": "VARCHAR",
        "answer": "VARCHAR", "correct": "BOOLEAN", "error": "VARCHAR", "n_tokens": "INTEGER",
        "truncated": "BOOLEAN"}),
)
_BY_FILE = {t.file: t for t in TABLES}

# Views over the tables: the RL evaluation curves with the base model as step 0 of every RL cell.
VIEWS = {
    "eval_curves": """
        SELECT * FROM evals WHERE algo <> 'base'
        UNION ALL BY NAME
        SELECT e.* REPLACE (c.algo AS algo, c.kl AS kl)
        FROM evals e
        JOIN (SELECT DISTINCT mixture, scale, algo, kl, seed FROM cells WHERE algo <> 'base') c
          ON e.algo = 'base' AND e.mixture = c.mixture AND e.scale = c.scale AND e.seed = c.seed
        WHERE NOT EXISTS (SELECT 1 FROM evals r
                          WHERE r.mixture = c.mixture AND r.scale = c.scale AND r.algo = c.algo
                            AND r.kl = c.kl AND r.seed = c.seed AND r.benchmark = e.benchmark
                            AND r.step = e.step)""",
}

# One row per RL cell on the primary benchmark (the first configured): what the findings (F1-F7,
# echochamber.findings) are judged on. ``winner``: the most common format; ``collapse_step``: the first
# rollout step at which one format holds at least 90% of the samples; ``gain_step``: the checkpoint that
# ends the interval with the largest pass@1 gain; ``episode_end``: the last step of the first episode.
_TOP_SHARE = "greatest(" + ", ".join(f"coalesce(share_{f}, 0)" for f in ANSWER_FORMATS) + ")"
_WINNER = "CASE " + " ".join(f"WHEN coalesce(share_{f}, 0) = {_TOP_SHARE} THEN '{f}'" for f in ANSWER_FORMATS) + " END"


def _of_format(column: str, fmt: str, table: str) -> str:
    """SQL for ``table.<column>_<f>`` where ``f`` is the format named by the SQL expression ``fmt``."""
    return "CASE " + " ".join(f"WHEN {fmt} = '{f}' THEN {table}.{column}_{f}" for f in ANSWER_FORMATS) + " END"


VIEWS["rl_outcomes"] = f"""
    WITH curve AS (
        SELECT *, {_TOP_SHARE} AS top_share, {_WINNER} AS top_format,
               pass1 - lag(pass1) OVER (PARTITION BY mixture, scale, algo, kl, seed ORDER BY step) AS gain
        FROM eval_curves
        WHERE benchmark = (SELECT json_extract_string(value, '$[0]') FROM meta WHERE key = 'benchmarks')
    ),
    ends AS (
        SELECT mixture, scale, algo, kl, seed, max(step) AS final_step, max(pass_k) AS pass_k_peak,
               arg_max(step, gain) FILTER (WHERE gain IS NOT NULL) AS gain_step,
               max(gain) AS gain
        FROM curve GROUP BY ALL
    ),
    rollouts AS (
        SELECT mixture, scale, algo, kl, seed,
               min(step) FILTER (WHERE {_TOP_SHARE} >= 0.9) AS collapse_step,
               max(step) FILTER (WHERE episode = 0) AS episode_end
        FROM rl_steps GROUP BY ALL
    )
    SELECT e.mixture, e.scale, e.algo, e.kl, e.seed, e.final_step, r.episode_end, r.collapse_step,
           e.gain_step, e.gain,
           b.pass1 AS pass1_before, f.pass1 AS pass1_after, b.pass_k AS pass_k_before, f.pass_k AS pass_k_after,
           e.pass_k_peak, b.maj_k AS maj_k_before, f.maj_k AS maj_k_after,
           b.top_format AS majority_before, f.top_format AS winner, f.top_share AS winner_share_after,
           {_of_format('share', 'f.top_format', 'b')} AS winner_share_before,
           {_of_format('acc', 'f.top_format', 'b')} AS winner_acc_before,
           {_of_format('acc', 'b.top_format', 'b')} AS majority_acc_before
    FROM ends e
    JOIN curve f USING (mixture, scale, algo, kl, seed)
    JOIN curve b USING (mixture, scale, algo, kl, seed)
    LEFT JOIN rollouts r USING (mixture, scale, algo, kl, seed)
    WHERE f.step = e.final_step AND b.step = 0"""

_KEY = re.compile(r"^(mixture|scale|algo|kl|seed|benchmark|step)=(.+)$")


# ------------------------------------------------------------------------------------------- paths


def coordinates(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> dict:
    """The typed cell coordinates written in a hive-style path (the deepest ``key=value`` wins).

    A pretraining path has no ``algo``/``kl``: it is the ``base`` cell with ``kl`` 0.
    """
    found = {}
    for part in Path(path).parts[:-1]:
        m = _KEY.match(part)
        if m:
            found[m.group(1)] = m.group(2)
    found.setdefault("algo", BASE_ALGO)
    found.setdefault("kl", "0")
    missing = [k for k in ("mixture", "scale", "seed", *keys) if k not in found]
    if missing:
        raise StoreError(f"cannot read the cell coordinates from {path}: no {'/'.join(f'{k}=...' for k in missing)} "
                         f"folder in the path (expected .../mixture=M/scale=Z/[algo=A/kl=B/]seed=K/...)")
    try:
        out = {"mixture": found["mixture"], "scale": found["scale"], "algo": found["algo"],
               "kl": float(found["kl"]), "seed": int(found["seed"])}
    except ValueError:
        raise StoreError(f"cannot read the cell coordinates from {path}: kl={found['kl']} or "
                         f"seed={found['seed']} is not a number") from None
    for k in keys:
        out[k] = found[k]
    return out


def cell_key(c: dict) -> tuple:
    return (c["mixture"], c["scale"], c["algo"], float(c["kl"]), int(c["seed"]))


# ------------------------------------------------------------------------------------------- build


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


# The workflow rule that writes each table's files (named in errors, so the advice can be followed).
_WRITERS = {"pretrain_curves": "pretrain", "rl_steps": "rl", "samples": "rl"}
_ARROW_KINDS = {"DOUBLE": ("integer", "floating"), "INTEGER": ("integer",), "BIGINT": ("integer",),
                "VARCHAR": ("string",), "BOOLEAN": ("boolean",)}


def _writer(spec: TableSpec, coords: dict) -> str:
    if spec.name in _WRITERS:
        return _WRITERS[spec.name]
    return "eval_base" if coords["algo"] == BASE_ALGO else "eval_rl"


def _arrow_kind(t: pa.DataType) -> str:
    for kind, test in (("integer", pa.types.is_integer), ("floating", pa.types.is_floating),
                       ("string", lambda x: pa.types.is_string(x) or pa.types.is_large_string(x)),
                       ("boolean", pa.types.is_boolean), ("null", pa.types.is_null)):
        if test(t):
            return kind
    return str(t)


def _check_files(spec: TableSpec, files: list[str]) -> list[dict]:
    """Every file is readable parquet holding each documented column with a compatible type, and no cell
    appears twice; otherwise one sentence naming the file and the rule that writes it. Returns each
    file's coordinates."""
    import pyarrow.parquet as pq

    seen: dict[tuple, str] = {}
    rows = [coordinates(f, spec.path_keys) for f in files]
    for f, c in zip(files, rows):
        key = (*cell_key(c), *(c[k] for k in spec.path_keys))
        if key in seen:
            raise StoreError(f"{f} and {seen[key]} are the same cell of table {spec.name}; each cell's file "
                             f"must be listed once")
        seen[key] = f
        rule = _writer(spec, c)
        try:
            schema = pq.read_schema(f)
        except Exception as e:  # noqa: BLE001 - any reader error means the file is unusable
            raise StoreError(unreadable("file", f, e, rule)) from None
        have = dict(zip(schema.names, schema.types))
        missing = [c for c in spec.columns if c not in have]
        if missing:
            raise StoreError(f"{f} lacks the column(s) {', '.join(missing)} of table {spec.name}; delete it and "
                             f"rerun rule {rule}, which writes it")
        for col, sql_type in spec.columns.items():
            kind = _arrow_kind(have[col])
            if kind != "null" and kind not in _ARROW_KINDS[sql_type]:
                raise StoreError(f"{f}: column {col} holds {have[col]} values where table {spec.name} needs "
                                 f"{sql_type}; delete it and rerun rule {rule}, which writes it")
    return rows


def _create_table(con, spec: TableSpec, files: list[str]) -> int:
    """Create one table from its files (or empty with the documented columns); return its row count."""
    coord_cols = {**COORDS, **{k: "VARCHAR" for k in spec.path_keys}}
    if not files:
        cols = {**coord_cols, **spec.columns}
        con.execute(f"CREATE TABLE {spec.name} ({', '.join(f'{_ident(c)} {t}' for c, t in cols.items())})")
        return 0
    rows = _check_files(spec, files)
    paths = pa.table({
        "filename": pa.array(files, pa.string()),
        **{k: pa.array([r[k] for r in rows], pa.float64() if t == "DOUBLE" else
                       pa.int32() if t == "INTEGER" else pa.string()) for k, t in coord_cols.items()},
    })
    con.register("_paths", paths)
    listing = "[" + ", ".join(_sql_str(f) for f in files) + "]"
    # hive_partitioning off: the path's kl=... must not overwrite a file's own column of that name
    source = f"read_parquet({listing}, union_by_name = true, filename = true, hive_partitioning = false)"
    file_cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
    select = [f"p.{_ident(c)}" for c in coord_cols]
    names = set(coord_cols)
    for c in file_cols:
        if c == "filename":
            continue
        if c in names:          # the path is authoritative for a cell's coordinates
            continue
        expr = f"CAST(f.{_ident(c)} AS {spec.columns[c]})" if c in ("step", "sample") else f"f.{_ident(c)}"
        select.append(f"{expr} AS {_ident(c)}")
        names.add(c)
    order = ", ".join(["p.mixture", "p.scale", "p.algo", "p.kl", "p.seed", *[f"p.{k}" for k in spec.path_keys]]
                      + (["step"] if "step" in names else []))
    con.execute(f"CREATE TABLE {spec.name} AS SELECT {', '.join(select)} FROM {source} f "
                f"JOIN _paths p USING (filename) ORDER BY {order}").fetchall()
    con.unregister("_paths")
    return con.execute(f"SELECT count(*) FROM {spec.name}").fetchall()[0][0]


def _create_machines(con, files: list[str]) -> list[dict]:
    """Create table ``machines`` from the cells' machine.json files; return the descriptions read."""
    cols = {**COORDS, **machine.FIELDS}
    con.execute(f"CREATE TABLE machines ({', '.join(f'{_ident(c)} {t}' for c, t in cols.items())})")
    described, rows = [], []
    for f in sorted(files):
        c = coordinates(f)
        try:
            d = json.loads(Path(f).read_text())
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            rule = "pretrain" if c["algo"] == BASE_ALGO else "rl"
            raise StoreError(f"{f} is not a readable machine description ({type(e).__name__}); delete it and "
                             f"rerun rule {rule}, which writes it") from None
        described.append(d)
        rows.append([c[k] for k in COORDS] + [d.get(k) for k in machine.FIELDS])
    if rows:
        con.executemany(f"INSERT INTO machines VALUES ({', '.join('?' * len(cols))})", rows)
    return described


def cell_status(cells: list[dict], files: list[str], benchmarks: list[str]) -> list[dict]:
    """One row per grid cell with its status: evaluated, trained / pretrained, or missing."""
    have: dict[tuple, set[str]] = {}
    for f in files:
        name = Path(f).name
        spec = _BY_FILE.get(name)
        coords = coordinates(f, spec.path_keys if spec else ())
        tag = f"{name}:{coords['benchmark']}" if spec and "benchmark" in spec.path_keys else name
        have.setdefault(cell_key(coords), set()).add(tag)
    out = []
    for c in cells:
        key = cell_key(c)
        got = have.get(key, set())
        base = c["algo"] == BASE_ALGO
        trained_file = "curve.parquet" if base else "steps.parquet"
        # the base model's curve lives in the pretraining cell, which has no algo/kl
        evaluated = all(f"metrics.parquet:{b}" in got for b in benchmarks)
        if trained_file in got and evaluated and benchmarks:
            status = "evaluated"
        elif trained_file in got:
            status = "pretrained" if base else "trained"
        else:
            status = "missing"
        out.append({"mixture": c["mixture"], "scale": c["scale"], "algo": c["algo"], "kl": float(c["kl"]),
                    "seed": int(c["seed"]), "kind": "base" if base else "rl", "status": status})
    return out


def _cells_from_files(files: list[str]) -> list[dict]:
    seen = {}
    for f in files:
        spec = _BY_FILE.get(Path(f).name)
        c = coordinates(f, spec.path_keys if spec else ())
        seen[cell_key(c)] = {k: c[k] for k in COORDS}
    return [seen[k] for k in sorted(seen)]


def _remove_stale_temporaries(db_path: Path) -> None:
    """Remove what a killed ingest left beside the store (its temporary file, WAL and spill folder)."""
    pattern = re.compile(rf"^\.{re.escape(db_path.name)}\.tmp(\d+)")
    for p in db_path.parent.glob(f".{db_path.name}.tmp*"):
        m = pattern.match(p.name)
        if not m or _alive(int(m.group(1))):
            continue
        if p.is_dir():
            import shutil
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build(db_path: str | os.PathLike, files: list[str | os.PathLike], cells: list[dict] | None = None,
          benchmarks: list[str] | None = None, scales: list[str] | None = None, allow_missing: bool = False,
          log=None) -> dict[str, int]:
    """Build the store at ``db_path`` from an explicit list of per-cell parquet files (and the cells'
    ``machine.json``, where given); return rows per table.

    ``cells`` (coordinate dicts, base cells with ``algo='base'``, ``kl=0``) fill the ``cells`` table with a
    status each; by default they are read from the files' paths. ``benchmarks`` is the configured order
    (the first one is the primary benchmark of summaries and figures); ``scales`` the grid's scales, smallest
    first (findings compare scales in that order; grid.scales_by_size). A missing file is an error unless
    ``allow_missing``, which marks its cell accordingly.
    """
    db_path = Path(db_path)
    files = [str(f) for f in files]
    missing = [f for f in files if not Path(f).exists()]
    if missing and not allow_missing:
        raise StoreError(f"input file {missing[0]} does not exist ({len(missing)} missing); "
                         f"rerun the rule that writes it")
    files = [f for f in files if Path(f).exists()]
    machine_files = [f for f in files if Path(f).name == machine.FILE]
    files = [f for f in files if Path(f).name != machine.FILE]
    unknown = [f for f in files if Path(f).name not in _BY_FILE]
    if unknown:
        raise StoreError(f"{unknown[0]} is not a results file the store knows "
                         f"(expected one of {', '.join([*_BY_FILE, machine.FILE])})")
    by_table = {t.name: sorted(f for f in files if Path(f).name == t.file) for t in TABLES}
    if benchmarks is None:
        benchmarks = sorted({coordinates(f, ("benchmark",))["benchmark"] for f in by_table["evals"]})
    if cells is None:
        cells = _cells_from_files(files)
    _remove_stale_temporaries(db_path)
    counts = {}
    with atomic_path(db_path) as tmp:
        con = duckdb.connect(str(tmp))
        try:
            for spec in TABLES:
                counts[spec.name] = _create_table(con, spec, by_table[spec.name])
                if log:
                    log.info("table %s: %d rows from %d files", spec.name, counts[spec.name],
                             len(by_table[spec.name]))
            status = cell_status(cells, files, benchmarks)
            con.execute("CREATE TABLE cells (mixture VARCHAR, scale VARCHAR, algo VARCHAR, kl DOUBLE, "
                        "seed INTEGER, kind VARCHAR, status VARCHAR)")
            if status:
                con.executemany("INSERT INTO cells VALUES (?, ?, ?, ?, ?, ?, ?)",
                                [tuple(r.values()) for r in status])
            counts["cells"] = len(status)
            described = _create_machines(con, machine_files)
            counts["machines"] = len(described)
            meta = {"built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "benchmarks": json.dumps(list(benchmarks)), "n_files": str(len(files))}
            if scales is not None:
                meta["scales"] = json.dumps(list(scales))
            if described:
                meta["machine"] = machine.summary(described)
            con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            con.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
            for name, sql in VIEWS.items():     # after meta: rl_outcomes reads the primary benchmark there
                con.execute(f"CREATE VIEW {name} AS {sql}")
            con.execute("CHECKPOINT")
        except duckdb.Error as e:
            raise StoreError(f"building {db_path} failed: {str(e).splitlines()[0]}") from None
        finally:
            con.close()
            # a WAL left by someone who opened the old store read-write must not replay onto the new one
            Path(f"{db_path}.wal").unlink(missing_ok=True)
            for extra in (Path(f"{tmp}.wal"), Path(f"{tmp}.tmp")):
                if extra.is_dir():
                    import shutil
                    shutil.rmtree(extra, ignore_errors=True)
                else:
                    extra.unlink(missing_ok=True)
    return counts


# ------------------------------------------------------------------------------------------- query


def saved_queries() -> dict[str, str]:
    """Saved query name -> its first comment line (what question it answers)."""
    out = {}
    for p in sorted(QUERIES_DIR.glob("*.sql")):
        first = next((ln for ln in p.read_text().splitlines() if ln.strip()), "")
        out[p.stem] = first.lstrip("- ").strip()
    return out


def resolve_sql(sql: str) -> str:
    """SQL text, a saved query's name (``pass1_before_after``) or a path to a ``.sql`` file."""
    s = sql.strip()
    if re.fullmatch(r"[\w-]+", s) and (QUERIES_DIR / f"{s}.sql").exists():
        return (QUERIES_DIR / f"{s}.sql").read_text()
    if s.endswith(".sql") and "\n" not in s:
        p = Path(s)
        if not p.exists():
            raise StoreError(f"query file {p} does not exist; saved queries: {', '.join(saved_queries())}")
        return p.read_text()
    return sql


def connect(db_path: str | os.PathLike):
    """A read-only connection to the store (several readers at once; the ingest never waits for them)."""
    path = Path(db_path)
    if not path.exists():
        raise StoreError(f"results store {path} does not exist; build it with snakemake (rule ingest) first")
    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:
        raise StoreError(f"{path} is not a readable DuckDB results store ({str(e).splitlines()[0]})") from None


def fetch(db_path: str | os.PathLike, sql: str, params: list | None = None):
    """Run read-only SQL (or a saved query) and return a pandas DataFrame."""
    con = connect(db_path)
    try:
        cur = con.execute(resolve_sql(sql), params or [])
        if cur.description is None:
            import pandas as pd
            return pd.DataFrame()
        return cur.df()
    except duckdb.Error as e:
        raise StoreError(f"query on {db_path} failed: {str(e).splitlines()[0]}") from None
    finally:
        con.close()


def format_frame(df, fmt: str = "table") -> str:
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        records = df.astype(object).where(df.notna(), None).to_dict(orient="records")
        return json.dumps(records, default=str, indent=1)
    if df.empty:
        return " ".join(df.columns) + "\n(0 rows)" if len(df.columns) else "(no result)"
    return df.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="NULL")


def query(db_path: str | os.PathLike, sql: str, fmt: str = "table") -> str:
    """Run SQL (text, a saved query's name or a .sql path) on the store opened read-only.

    Returns an aligned text table, CSV or JSON (a list of row objects). Raises StoreError with one
    sentence when the store is missing or the query fails.
    """
    if fmt not in OUTPUT_FORMATS:
        raise StoreError(f"unknown output format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    return format_frame(fetch(db_path, sql), fmt)


def meta(db_path: str | os.PathLike) -> dict:
    df = fetch(db_path, "SELECT key, value FROM meta")
    out = dict(zip(df["key"], df["value"]))
    out["benchmarks"] = json.loads(out.get("benchmarks", "[]"))
    out["scales"] = json.loads(out["scales"]) if "scales" in out else None   # smallest first, when recorded
    return out
