CALIB = config["calib"]
QUANT = config["quant"]  # the primary build's recipe; a grid build's comes from build_quant()
EVAL = config["eval"]


def mem_mb(factor, base=1500):
    """`resources: mem_mb=` from the inputs' size on disk (the fp16 model): base + factor × size, MB."""
    return lambda wildcards, input: base + int(factor * input.size_mb)


rule calibrate:
    """Per-channel activation statistics of every linear input (results/<model>/calib/, per source model)."""
    input:
        model=model_files,
        text=text_input(CALIB["dataset"]),
    output:
        "results/{model}/calib/act_stats.safetensors",
    wildcard_constraints:
        model=_alternatives(SOURCES),
    params:
        model_dir=input_model_dir,
        text_dir=input_text_dir,
        calib=CALIB,
        device=device_flag(),
    threads: 2
    resources:
        mem_mb=mem_mb(3),
        runtime=60,
        **GPU_RESOURCES,
    log:
        "logs/{model}/calibrate.log",
    benchmark:
        "benchmarks/{model}/calibrate.tsv"
    shell:
        "lmkiln lite calibrate {params.model_dir} --calib-dataset {params.calib[dataset]} "
        "--calib-samples {params.calib[samples]} --calib-seqlen {params.calib[seqlen]} "
        "--seed {params.calib[seed]} --text-dir {params.text_dir} --out {output} {params.device} > {log} 2>&1"


rule awq:
    """AWQ scale + clip search and int4 packing in the AutoAWQ-GEMM format (results/<model>/awq/)."""
    input:
        model=model_files,
        stats=calib_stats,
        text=text_input(CALIB["dataset"]),
    output:
        directory("results/{model}/awq"),
    params:
        model_dir=input_model_dir,
        text_dir=input_text_dir,
        quant=build_quant,
        seed=CALIB["seed"],
        search=lambda wc: "--search-scale" if build_quant(wc)["search_scale"] else "",
        device=device_flag(),
    threads: 2
    resources:
        mem_mb=mem_mb(4),
        runtime=240,
        **GPU_RESOURCES,
    log:
        "logs/{model}/awq.log",
    benchmark:
        "benchmarks/{model}/awq.tsv"
    shell:
        "lmkiln lite awq {params.model_dir} --calib-stats {input.stats} --w-bits {params.quant[w_bits]} "
        "--w-group-size {params.quant[w_group_size]} {params.search} "
        "--search-tokens {params.quant[search_tokens]} --stat-tokens {params.quant[stat_tokens]} "
        "--seed {params.seed} --text-dir {params.text_dir} --work-dir {output} {params.device} > {log} 2>&1"


rule evaluate:
    """Perplexity of fp16 / RTN / AWQ on held-out text; fails the build when AWQ misses the gate."""
    input:
        model=model_files,
        awq=rules.awq.output[0],
        texts=[t for name in EVAL["texts"] for t in text_input(name)],
    output:
        "results/{model}/eval/ppl.json",
    params:
        model_dir=input_model_dir,
        text_dir=input_text_dir,
        eval=EVAL,
        texts=" ".join(EVAL["texts"]),
        bos="--add-bos" if EVAL["add_bos"] else "",
    threads: 2
    resources:
        mem_mb=mem_mb(3, 2500),  # fp32 on the CPU (the evaluation protocol), one model at a time
        runtime=240,
    log:
        "logs/{model}/evaluate.log",
    benchmark:
        "benchmarks/{model}/evaluate.tsv"
    shell:
        "lmkiln eval ppl {params.model_dir} {input.awq} --texts {params.texts} --text-dir {params.text_dir} "
        "--tokens {params.eval[tokens]} --window {params.eval[window]} {params.bos} "
        "--max-ppl-increase {params.eval[max_ppl_increase]} --out {output} > {log} 2>&1"


rule pack:
    """TurboMind-style packed int4 layout for the W4A16 kernels (results/<model>/packed/)."""
    input:
        rules.awq.output[0],
    output:
        directory("results/{model}/packed"),
    resources:
        mem_mb=2000,
        runtime=30,
    log:
        "logs/{model}/pack.log",
    benchmark:
        "benchmarks/{model}/pack.tsv"
    shell:
        "lmkiln lite pack {input} {output} > {log} 2>&1"


def grid_benchmarks(wildcards=None):
    """Time / memory files the comparison table reads (calibration: once per source model)."""
    files = [f"benchmarks/{b}/{rule}.tsv" for b in GRID for rule in ("awq", "evaluate", "pack")]
    return files + sorted({f"benchmarks/{BUILDS[b].model}/calibrate.tsv" for b in GRID})


rule grid_summary:
    """One comparison table of the grid's builds: perplexity, gate, sizes, times (manifests verified)."""
    input:
        ppl=expand("results/{model}/eval/ppl.json", model=GRID),
        awq=expand("results/{model}/awq", model=GRID),
        packed=expand("results/{model}/packed", model=GRID),
        benchmarks=grid_benchmarks(),
    output:
        json=report("results/grid/summary.json", caption="../report/grid.rst", category="Grid"),
        md=report("results/grid/summary.md", caption="../report/grid.rst", category="Grid"),
    params:
        builds=" ".join(f"{b}:{BUILDS[b].model}:{BUILDS[b].recipe}" for b in GRID),
        results=lambda wc, input: Path(input.ppl[0]).parents[2],
        benchmarks=lambda wc, input: Path(input.benchmarks[0]).parents[1],
        out_dir=lambda wc, output: Path(output.json).parent,
    resources:
        mem_mb=1000,
        runtime=15,
    log:
        "logs/grid/summary.log",
    shell:
        "lmkiln report grid {params.builds} --results {params.results} --benchmarks {params.benchmarks} "
        "--out-dir {params.out_dir} > {log} 2>&1"
