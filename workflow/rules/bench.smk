# `snakemake bench`: every measurement of the built artifact, each a rule whose outputs go into the report
# (`snakemake bench --report results/<model>/report.html`). GPU-only rules (the W4A16 kernels) are left out
# of the DAG where no GPU is visible, with a message, rather than run to write a "skipped" file: a file
# would count as an up-to-date result and never be rebuilt on a GPU machine, and `snakemake -n bench` shows
# exactly what will be measured. `bench.gpu: true` keeps them in (e.g. a cluster whose GPU nodes are not the
# machine running snakemake).
import functools
import shlex
import sys

BENCH = config["bench"]
BENCH_DIR = "results/{model}/bench"


@functools.cache
def cuda_visible():
    """Whether torch sees a CUDA GPU on this machine (imported only when a bench rule is planned)."""
    import torch

    return torch.cuda.is_available()


def bench_device(wildcards=None):
    """Device of the agreement / engine / serving measurements."""
    device = BENCH["device"] or config["device"]
    if device and device != "auto":
        return device
    return "cuda" if cuda_visible() else "cpu"


def bench_gpu(wildcards=None):
    """`resources: gpu=` of a rule that runs on bench_device()."""
    return int(bench_device().startswith("cuda"))


def gpu_rules_enabled():
    return BENCH["gpu"] is True or (BENCH["gpu"] == "auto" and cuda_visible())


def skipped_measurements():
    """Measurement -> why it is not in this run (printed, and noted in the summary)."""
    if gpu_rules_enabled():
        return {}
    why = ("bench.gpu is false" if BENCH["gpu"] is False else
           "no CUDA GPU is visible to torch on this machine (bench.gpu: auto); run `snakemake bench` on a GPU "
           "machine, or set --config bench='{gpu: true}' where GPU nodes run the jobs")
    return {"W4A16 kernels (bench_kernels)": why}


def bench_outputs(wildcards=None, model=None):
    """Every file `snakemake bench` produces for a model (what the bench target and summary depend on)."""
    d = BENCH_DIR.format(model=model or wildcards.model)
    out = {
        "quality": f"{d}/quality.json",
        "kv_ppl": f"{d}/kv_ppl.json",
        "engine": f"{d}/engine/engine.json",
        "serve": f"{d}/serve.json",
        "ppl_png": f"{d}/ppl.png",
        "agreement_png": f"{d}/agreement.png",
        "tokps_png": f"{d}/tokps.png",
        "latency_png": f"{d}/latency_cdf.png",
    }
    if gpu_rules_enabled():
        out |= {"kernels": f"{d}/kernels/kernels.json", "bandwidth_png": f"{d}/kernels_bandwidth.png"}
    return out


def bench_targets():
    for what, why in skipped_measurements().items():
        print(f"snakemake bench: not measuring {what}: {why}", file=sys.stderr)
    return [f"results/{MODEL}/summary.md"]


def print_bench_summary():
    """Print the results table at the end of `snakemake bench` (it is also written beside the report)."""
    summary = Path(f"results/{MODEL}/summary.md")
    if "bench" in workflow.dag_settings.targets and summary.is_file():
        print(summary.read_text())
        print(f"(written to {summary}; the report: snakemake bench --report results/{MODEL}/report.html)")


def eval_texts():
    return [t for name in EVAL["texts"] for t in text_input(name)]


rule bench_quality:
    """Next-token agreement of RTN / AWQ / packed with the fp16 model; size on disk and in memory."""
    input:
        model=model_files,
        awq=rules.awq.output[0],
        packed=rules.pack.output[0],
        texts=eval_texts(),
    output:
        report(f"{BENCH_DIR}/quality.json", caption="../report/quality.rst", category="Quality"),
    params:
        model_dir=MODEL_DIR,
        texts=" ".join(EVAL["texts"]),
        q=BENCH["quality"],
        bos="--add-bos" if EVAL["add_bos"] else "",
        device=bench_device,
    resources:
        gpu=bench_gpu,
    log:
        "logs/{model}/bench_quality.log",
    benchmark:
        "benchmarks/{model}/bench_quality.tsv"
    shell:
        "lmkiln bench quality {params.model_dir} --awq {input.awq} --packed {input.packed} "
        "--texts {params.texts} --text-dir {TEXT_DIR} --tokens {params.q[tokens]} --window {params.q[window]} "
        "{params.bos} --device {params.device} --out {output} > {log} 2>&1"


rule bench_kv_ppl:
    """Perplexity through the engine of the packed artifact, KV cache fp / int8 / int4 (eval's protocol)."""
    input:
        packed=rules.pack.output[0],
        reference=rules.evaluate.output[0],
        texts=eval_texts(),
    output:
        report(f"{BENCH_DIR}/kv_ppl.json", caption="../report/kv_ppl.rst", category="Quality"),
    params:
        texts=" ".join(EVAL["texts"]),
        eval=EVAL,
        bos="--add-bos" if EVAL["add_bos"] else "",
        policies=" ".join(str(p) for p in [0, *BENCH["quality"]["kv_quant_policies"]]),
        device=bench_device,
    resources:
        gpu=bench_gpu,
    log:
        "logs/{model}/bench_kv_ppl.log",
    benchmark:
        "benchmarks/{model}/bench_kv_ppl.tsv"
    shell:
        "lmkiln bench kv-ppl {input.packed} --texts {params.texts} --text-dir {TEXT_DIR} "
        "--tokens {params.eval[tokens]} --window {params.eval[window]} {params.bos} "
        "--quant-policy {params.policies} --reference {input.reference} --device {params.device} "
        "--out {output} > {log} 2>&1"


def engine_settings(wildcards=None):
    s = BENCH["engine"]["cuda" if bench_device().startswith("cuda") else "cpu"]
    flags = [f"--batch-sizes {' '.join(map(str, s['batch_sizes']))}", f"--prompt-len {s['prompt_len']}",
             f"--output-len {s['output_len']}", f"--num-requests {s['num_requests']}",
             f"--throughput-prompt-len {s['throughput_prompt_len']}",
             f"--throughput-output-len {s['throughput_output_len']}", "--quant-policy 0 8"]
    flags.append(f"--session-turns {s['session_turns']}" if s["session_turns"] else "--skip-session")
    return " ".join(flags + ([] if s["hf_baseline"] else ["--skip-hf"]))


rule bench_engine:
    """Decode tokens/s by batch (int4 and fp16 engine, HF static-cache baseline), throughput, TTFT/TPOT,
    memory, session TTFT."""
    input:
        packed=rules.pack.output[0],
        model=model_files,
    output:
        report(f"{BENCH_DIR}/engine/engine.json", caption="../report/engine.rst", category="Engine"),
    params:
        out_dir=lambda wc: f"{BENCH_DIR.format(model=wc.model)}/engine",
        model_dir=MODEL_DIR,
        group_size=QUANT["w_group_size"],
        flags=engine_settings,
        device=bench_device,
    resources:
        gpu=bench_gpu,
    log:
        "logs/{model}/bench_engine.log",
    benchmark:
        "benchmarks/{model}/bench_engine.tsv"
    shell:
        "lmkiln bench engine {input.packed} --hf-model {params.model_dir} --group-size {params.group_size} "
        "--out {params.out_dir} --device {params.device} {params.flags} > {log} 2>&1"


rule bench_serve:
    """The api_server on loopback under a streaming load with clients leaving mid-stream."""
    input:
        packed=rules.pack.output[0],
    output:
        report(f"{BENCH_DIR}/serve.json", caption="../report/serve.rst", category="Serving"),
    params:
        s=BENCH["serve"],
        device=bench_device,
    resources:
        gpu=bench_gpu,
    log:
        "logs/{model}/bench_serve.log",
    benchmark:
        "benchmarks/{model}/bench_serve.tsv"
    shell:
        "lmkiln bench serve --model-dir {input.packed} --device {params.device} "
        "--num-requests {params.s[num_requests]} --concurrency {params.s[concurrency]} "
        "--abort-fraction {params.s[abort_fraction]} --max-tokens {params.s[max_tokens]} "
        "--endpoint {params.s[endpoint]} --out {output} > {log} 2>&1"


rule bench_kernels:
    """W4A16 kernels vs fp16 cuBLAS, torch int4 tinygemm and the HBM floor (needs a CUDA GPU)."""
    output:
        json=report(f"{BENCH_DIR}/kernels/kernels.json", caption="../report/kernels.rst", category="Kernels"),
        roofline=report(f"{BENCH_DIR}/kernels/kernels_roofline.png", caption="../report/roofline.rst",
                        category="Kernels"),
    params:
        out_dir=lambda wc: f"{BENCH_DIR.format(model=wc.model)}/kernels",
        group_size=QUANT["w_group_size"],
        m=" ".join(str(m) for m in BENCH["kernels"]["m"]),
    resources:
        gpu=1,
    log:
        "logs/{model}/bench_kernels.log",
    benchmark:
        "benchmarks/{model}/bench_kernels.tsv"
    shell:
        "lmkiln bench kernels --out {params.out_dir} --group-size {params.group_size} --m {params.m} "
        "> {log} 2>&1"


rule bench_plot_ppl:
    input:
        ppl=rules.evaluate.output[0],
        kv=rules.bench_kv_ppl.output[0],
        quality=rules.bench_quality.output[0],
    output:
        report(f"{BENCH_DIR}/ppl.png", caption="../report/ppl.rst", category="Quality"),
    log:
        "logs/{model}/bench_plot_ppl.log",
    shell:
        "lmkiln bench plot ppl --ppl {input.ppl} --kv-ppl {input.kv} --quality {input.quality} "
        "--out {output} > {log} 2>&1"


rule bench_plot_agreement:
    input:
        rules.bench_quality.output[0],
    output:
        report(f"{BENCH_DIR}/agreement.png", caption="../report/agreement.rst", category="Quality"),
    log:
        "logs/{model}/bench_plot_agreement.log",
    shell:
        "lmkiln bench plot agreement --quality {input} --out {output} > {log} 2>&1"


rule bench_plot_tokps:
    input:
        rules.bench_engine.output[0],
    output:
        report(f"{BENCH_DIR}/tokps.png", caption="../report/tokps.rst", category="Engine"),
    log:
        "logs/{model}/bench_plot_tokps.log",
    shell:
        "lmkiln bench plot tokps --engine {input} --out {output} > {log} 2>&1"


rule bench_plot_latency:
    input:
        rules.bench_serve.output[0],
    output:
        report(f"{BENCH_DIR}/latency_cdf.png", caption="../report/latency.rst", category="Serving"),
    log:
        "logs/{model}/bench_plot_latency.log",
    shell:
        "lmkiln bench plot latency --serve {input} --out {output} > {log} 2>&1"


rule bench_plot_bandwidth:
    input:
        rules.bench_kernels.output.json,
    output:
        report(f"{BENCH_DIR}/kernels_bandwidth.png", caption="../report/bandwidth.rst", category="Kernels"),
    log:
        "logs/{model}/bench_plot_bandwidth.log",
    shell:
        "lmkiln bench plot bandwidth --kernels {input} --out {output} > {log} 2>&1"


rule bench_summary:
    """One results table over every measurement: markdown beside the report, HTML inside it."""
    input:
        unpack(bench_outputs),
        ppl=rules.evaluate.output[0],
    output:
        md="results/{model}/summary.md",
        html=report(f"{BENCH_DIR}/summary.html", caption="../report/summary.rst", category="Summary"),
    params:
        results=lambda wc: f"results/{wc.model}",
        skipped=lambda wc: " ".join(f"--skipped {shlex.quote(f'{k}={v}')}"
                                    for k, v in skipped_measurements().items()),
    log:
        "logs/{model}/bench_summary.log",
    shell:
        "lmkiln bench summary {params.results} --benchmarks benchmarks/{wildcards.model} {params.skipped} "
        "--md {output.md} --html {output.html} > {log} 2>&1"


localrules:
    bench_plot_ppl,
    bench_plot_agreement,
    bench_plot_tokps,
    bench_plot_latency,
    bench_plot_bandwidth,
    bench_summary,
