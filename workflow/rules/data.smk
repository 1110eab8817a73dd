rule prepare_texts:
    """Calibration and held-out texts from packaged sources (gensim wheel, Debian r-cran-janeaustenr)."""
    output:
        expand("{dir}/{name}.txt", dir=TEXT_DIR, name=PREPARED_TEXTS),
        f"{TEXT_DIR}/texts.json",
    params:
        out_dir=lambda wc, output: Path(output[-1]).parent,
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        "logs/prepare_texts.log",
    benchmark:
        "benchmarks/prepare_texts.tsv"
    shell:
        "lmkiln data prepare-texts {params.out_dir} > {log} 2>&1"


rule import_gguf:
    """fp16 HF directory from the GGUF file shipped in a Python package (the default model)."""
    output:
        "resources/models/{gguf_model}/config.json",
        "resources/models/{gguf_model}/model.safetensors",
    params:
        out_dir=lambda wc, output: Path(output[0]).parent,
        package=config["gguf"]["package"],
        file=config["gguf"]["file"],
    wildcard_constraints:
        gguf_model=GGUF_MODEL,
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        "logs/import_gguf/{gguf_model}.log",
    benchmark:
        "benchmarks/import_gguf/{gguf_model}.tsv"
    shell:
        "lmkiln convert gguf {params.out_dir} --package {params.package} --file {params.file} --overwrite "
        "> {log} 2>&1"
