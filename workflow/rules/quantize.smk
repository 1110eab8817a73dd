CALIB = config["calib"]
QUANT = config["quant"]
EVAL = config["eval"]


rule calibrate:
    """Per-channel activation statistics of every linear input (results/<model>/calib/)."""
    input:
        model=model_files,
        text=text_input(CALIB["dataset"]),
    output:
        "results/{model}/calib/act_stats.safetensors",
    params:
        model_dir=MODEL_DIR,
        calib=CALIB,
        device=device_flag(),
    log:
        "logs/{model}/calibrate.log",
    benchmark:
        "benchmarks/{model}/calibrate.tsv"
    shell:
        "lmkiln lite calibrate {params.model_dir} --calib-dataset {params.calib[dataset]} "
        "--calib-samples {params.calib[samples]} --calib-seqlen {params.calib[seqlen]} "
        "--seed {params.calib[seed]} --text-dir {TEXT_DIR} --out {output} {params.device} > {log} 2>&1"


rule awq:
    """AWQ scale + clip search and int4 packing in the AutoAWQ-GEMM format (results/<model>/awq/)."""
    input:
        model=model_files,
        stats=rules.calibrate.output[0],
        text=text_input(CALIB["dataset"]),
    output:
        directory("results/{model}/awq"),
    params:
        model_dir=MODEL_DIR,
        quant=QUANT,
        seed=CALIB["seed"],
        search="--search-scale" if QUANT["search_scale"] else "",
        device=device_flag(),
    log:
        "logs/{model}/awq.log",
    benchmark:
        "benchmarks/{model}/awq.tsv"
    shell:
        "lmkiln lite awq {params.model_dir} --calib-stats {input.stats} --w-bits {params.quant[w_bits]} "
        "--w-group-size {params.quant[w_group_size]} {params.search} "
        "--search-tokens {params.quant[search_tokens]} --stat-tokens {params.quant[stat_tokens]} "
        "--seed {params.seed} --text-dir {TEXT_DIR} --work-dir {output} {params.device} > {log} 2>&1"


rule evaluate:
    """Perplexity of fp16 / RTN / AWQ on held-out text; fails the build when AWQ misses the gate."""
    input:
        model=model_files,
        awq=rules.awq.output[0],
        texts=[t for name in EVAL["texts"] for t in text_input(name)],
    output:
        "results/{model}/eval/ppl.json",
    params:
        model_dir=MODEL_DIR,
        eval=EVAL,
        texts=" ".join(EVAL["texts"]),
        bos="--add-bos" if EVAL["add_bos"] else "",
    log:
        "logs/{model}/evaluate.log",
    benchmark:
        "benchmarks/{model}/evaluate.tsv"
    shell:
        "lmkiln eval ppl {params.model_dir} {input.awq} --texts {params.texts} --text-dir {TEXT_DIR} "
        "--tokens {params.eval[tokens]} --window {params.eval[window]} {params.bos} "
        "--max-ppl-increase {params.eval[max_ppl_increase]} --out {output} > {log} 2>&1"


rule pack:
    """TurboMind-style packed int4 layout for the W4A16 kernels (results/<model>/packed/)."""
    input:
        rules.awq.output[0],
    output:
        directory("results/{model}/packed"),
    log:
        "logs/{model}/pack.log",
    benchmark:
        "benchmarks/{model}/pack.tsv"
    shell:
        "lmkiln lite pack {input} {output} > {log} 2>&1"
