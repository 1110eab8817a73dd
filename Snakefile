# lmkiln: checkpoint -> calibration stats -> AWQ int4 -> quality gate.
# Targets: `snakemake quantize`; `snakemake serve` (the packed model behind the OpenAI API, in the
# foreground). Settings: config.yaml (schema: workflow/schemas/config.schema.yaml).

configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/serve.smk"


localrules:
    quantize,
    serve,


rule quantize:
    """Build the AWQ artifact of the configured model and pass its quality gate."""
    input:
        quantize_targets(),
    default_target: True


onsuccess:
    print_summary()
