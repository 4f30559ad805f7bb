# Data stage: each source's splits in the shared schema, and the tokenizer over the mixtures' text.


rule source:
    conda:
        CONDA_ENV
    output:
        train=f"{R}/data/source={{source}}/train.parquet",
        test=f"{R}/data/source={{source}}/test.parquet",
        hard=f"{R}/data/source={{source}}/hard.parquet",
    input:
        lambda w: [SRC / "data" / f for f in ("synthetic.py", "sources.py")]
        + ([SRC / "data" / "hub.py"] if source_spec(config, w.source)["kind"] == "hub" else []),
        SCRIPTS / "make_source.py",
    params:
        spec=lambda w: source_spec(config, w.source),
    log:
        f"{R}/logs/data/source={{source}}.log",
    benchmark:
        f"{R}/benchmarks/data/source={{source}}.tsv"
    script:
        "../workflow_scripts/make_source.py"


rule tokenizer:
    conda:
        CONDA_ENV
    output:
        f"{R}/tokenizer/tokenizer_config.json",
    input:
        SRC / "data" / "tokenizer.py",
        SCRIPTS / "make_tokenizer.py",
        # a BPE is trained on the mixtures' text; a pretrained tokenizer needs no data
        train=(
            expand(f"{R}/data/source={{source}}/train.parquet", source=ec_grid.mixture_sources(config))
            if config["tokenizer"]["kind"] == "bpe"
            else []
        ),
    params:
        spec=config["tokenizer"],
    log:
        f"{R}/logs/tokenizer.log",
    benchmark:
        f"{R}/benchmarks/tokenizer.tsv"
    script:
        "../workflow_scripts/make_tokenizer.py"
