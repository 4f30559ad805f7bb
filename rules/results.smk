# The results store and the paper's figures: ONE ingest rule (the only writer) builds echo.duckdb from the
# explicit list of per-cell parquet files; the report rule draws the figures and report.html from it.


rule ingest:
    conda:
        CONDA_ENV
    output:
        # update(): Snakemake keeps the previous store while the job runs (no deletion first); the
        # script replaces it atomically, so readers always see a complete database.
        update(f"{R}/echo.duckdb"),
    input:
        SRC / "store.py",
        SRC / "machine.py",
        SCRIPTS / "ingest.py",
        **store_inputs(),
    params:
        cells=store_cells(),
        benchmarks=list(ec_eval.benchmarks(config)),
        scales=ec_grid.scales_by_size(config),  # smallest first: how findings compare scales
    log:
        f"{R}/logs/ingest.log",
    benchmark:
        f"{R}/benchmarks/ingest.tsv"
    script:
        "../workflow_scripts/ingest.py"


rule report:
    conda:
        CONDA_ENV
    output:
        html=report(f"{R}/report.html", category="Report", caption="report/workflow.rst"),
        summary=f"{R}/summary.txt",
        findings=report(f"{R}/findings.tsv", category="Findings", caption="report/findings.rst"),
        figures=report(
            directory(f"{R}/figures"), patterns=["{name}.png"], category="Figures", caption="report/figures.rst"
        ),
    input:
        [SRC / f for f in ("plots.py", "report.py", "store.py", "findings.py")],
        sorted(Path(workflow.basedir, "queries").glob("*.sql")),
        SCRIPTS / "make_report.py",
        db=f"{R}/echo.duckdb",
    params:
        mixtures={m: config["mixtures"][m] for m in ec_grid.values(config, "mixtures")},
        scales=ec_grid.scales_by_size(config),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    script:
        "../workflow_scripts/make_report.py"
