# lmkiln: checkpoint -> calibration stats -> AWQ int4 -> quality gate.
# Targets: `snakemake quantize`; `snakemake bench` (every measurement of the artifact; then
# `snakemake bench --report results/<model>/report.html`); `snakemake serve` (the packed model behind the
# OpenAI API, in the foreground); `snakemake grid` (models × recipes of config.yaml, compared in
# results/grid/summary.md). Cluster runs: --workflow-profile workflow/profiles/slurm (docs/cluster.md).
# Settings: config.yaml (schema: workflow/schemas/config.schema.yaml).

configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/serve.smk"
include: "workflow/rules/bench.smk"


localrules:
    quantize,
    bench,
    serve,
    grid,


rule quantize:
    """Build the AWQ artifact of the configured model and pass its quality gate."""
    input:
        quantize_targets(),
    default_target: True


rule grid:
    """Build every model × recipe of the grid and gather them into one comparison table."""
    input:
        lambda wildcards: grid_targets(),  # checked only when the grid is asked for


rule bench:
    """Measure the artifact (quality, engine, serving, kernels where a GPU is) and summarize the results."""
    input:
        lambda wildcards: bench_targets(),  # planned only when asked for (it probes for a GPU)


onsuccess:
    print_summary()
    print_bench_summary()
