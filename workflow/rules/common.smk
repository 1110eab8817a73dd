import re
from pathlib import Path

from snakemake.utils import validate

from lmkiln.grid import plan_builds

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

# Builds: the primary one (`model:` + `quant:`, named after the model directory: `snakemake quantize`,
# `serve`, `bench`) and the grid (`models:` × `recipes:`, named <model>-<recipe>: `snakemake grid`).
# The {model} wildcard is a build name; calibration belongs to the source model (results/<model>/calib).
PLAN = plan_builds(config)
BUILDS = PLAN.builds
SOURCES = PLAN.sources
MODEL = PLAN.primary
MODEL_DIR = Path(config["model"])
GRID = list(dict.fromkeys([MODEL, *PLAN.grid]))  # the comparison table: the primary build, then the grid
TEXT_DIR = "resources/text"
# Texts the prepare_texts rule writes (lmkiln.data.texts.prepare_texts).
PREPARED_TEXTS = [
    "lee_news", "wiki_sample", "pride_and_prejudice", "emma", "mansfield_park", "northanger_abbey",
    "persuasion", "sense_and_sensibility",
]
GGUF_MODEL = Path(config["gguf"]["file"]).stem.split(".")[0]
# Jobs that run on a GPU when device is cuda: `gpu=1` (sbatch --gpus=1, a nvidia.com/gpu on Kubernetes)
# and, under SLURM, the cluster.gpu_partition partition. With device "" or cpu they ask for no GPU.
GPU_RESOURCES = (
    {"gpu": 1, **({"slurm_partition": config["cluster"]["gpu_partition"]}
                  if config["cluster"]["gpu_partition"] else {})}
    if config["device"] == "cuda" else {}
)


def _alternatives(names):
    return "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))


wildcard_constraints:
    model=_alternatives([*BUILDS, *SOURCES]),


def _model_dir(name):
    """HF directory of a build or a source model name."""
    return Path(BUILDS[name].model_dir) if name in BUILDS else Path(SOURCES[name])


def _submit_view(path):
    """Where this (submitting) process sees a workflow path: under the prefix of an `fs` default storage
    (the Kubernetes profile), else where it is."""
    s = workflow.storage_settings
    if s.default_storage_provider == "fs" and s.default_storage_prefix and not Path(path).is_absolute():
        return Path(s.default_storage_prefix) / path
    return Path(path)


def model_files(wildcards=None):
    """Files of the model directory that the build depends on (config + weights)."""
    model_dir = _model_dir(wildcards.model) if wildcards is not None and "model" in wildcards.keys() else MODEL_DIR
    seen = _submit_view(model_dir)
    weights = sorted(p.name for p in seen.glob("*.safetensors")) if seen.is_dir() else []
    return [str(model_dir / "config.json")] + [str(model_dir / w) for w in weights or ["model.safetensors"]]


# Shell commands take every path from {input} / {output} (or these helpers, derived from them), never
# from the config: without a shared filesystem a job sees its files where the storage plugin copied them.
def input_model_dir(wildcards, input):
    return Path(input.model[0]).parent  # a Path, as params.model_dir always was (no provenance rerun)


def input_text_dir(wildcards, input):
    """The prepared-texts directory as the job sees it (TEXT_DIR unless its files were copied in)."""
    for f in input:
        p = Path(f)
        if p.stem in PREPARED_TEXTS and str(p).endswith(f"{TEXT_DIR}/{p.name}"):
            return p.parent
    return Path(TEXT_DIR)


def build_quant(wildcards):
    return BUILDS[wildcards.model].quant


def calib_stats(wildcards):
    """The calibration statistics of a build's source model (shared by its recipes)."""
    return f"results/{BUILDS[wildcards.model].model}/calib/act_stats.safetensors"


def text_input(name):
    """A calibration/eval source as a workflow input: prepared texts come from prepare_texts."""
    if name in PREPARED_TEXTS:
        return [f"{TEXT_DIR}/{name}.txt"]
    return [name] if Path(name).exists() else []


def device_flag():
    return f"--device {config['device']}" if config["device"] else ""


def quantize_targets(build=None):
    build = build or MODEL
    return [f"results/{build}/awq", f"results/{build}/eval/ppl.json", f"results/{build}/packed"]


def grid_targets():
    PLAN.require_grid()  # a grid whose names clash fails here, not when planning other targets
    return ["results/grid/summary.md", "results/grid/summary.json"]


def print_summary():
    from lmkiln.report import quantize_summary

    targets = workflow.dag_settings.targets or {"quantize"}
    if "grid" in targets:
        summary = Path("results/grid/summary.md")
        if summary.is_file():
            print(summary.read_text())
        return
    print(quantize_summary(Path("results") / MODEL, Path("benchmarks") / MODEL))
