# The results store and the paper's figures: ONE ingest rule (the only writer) builds echo.duckdb from the
# explicit list of per-cell parquet files; the report rule draws the figures and report.html from it.


def store_inputs():
    """Every per-cell parquet file the store is built from, by table."""
    rl = ec_grid.rl_cells(config)
    evals = eval_outputs()
    return {
        "curves": [f"{R}/pretrain/{c.id}/curve.parquet" for c in ec_grid.pretrain_cells(config)],
        "steps": [f"{R}/rl/{c.id}/steps.parquet" for c in rl],
        "samples": [f"{R}/rl/{c.id}/samples.parquet" for c in rl],
        "evals": evals,
        "generations": [f[: -len("metrics.parquet")] + "generations.parquet" for f in evals],
    }


def store_cells():
    """The grid's cells as coordinates; base models are algo=base, kl=0."""
    base = [dict(mixture=c.mixture, scale=c.scale, algo="base", kl=0.0, seed=c.seed)
            for c in ec_grid.pretrain_cells(config)]
    return base + [c.as_dict() for c in ec_grid.rl_cells(config)]


def results_outputs():
    return [f"{R}/echo.duckdb", f"{R}/report.html", f"{R}/summary.txt"]


rule ingest:
    output:
        # update(): Snakemake keeps the previous store while the job runs (no deletion first); the
        # script replaces it atomically, so readers always see a complete database.
        update(f"{R}/echo.duckdb"),
    input:
        SRC / "store.py",
        **store_inputs(),
    params:
        cells=store_cells(),
        benchmarks=list(ec_eval.benchmarks(config)),
    log:
        f"{R}/logs/ingest.log",
    benchmark:
        f"{R}/benchmarks/ingest.tsv"
    script:
        "../workflow_scripts/ingest.py"


rule report:
    output:
        html=f"{R}/report.html",
        summary=f"{R}/summary.txt",
        figures=directory(f"{R}/figures"),
    input:
        [SRC / f for f in ("plots.py", "report.py", "store.py")],
        sorted(Path(workflow.basedir, "queries").glob("*.sql")),
        db=f"{R}/echo.duckdb",
    params:
        mixtures={m: config["mixtures"][m] for m in config["grid"]["mixtures"]},
        scales=list(config["grid"]["scales"]),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    script:
        "../workflow_scripts/make_report.py"
