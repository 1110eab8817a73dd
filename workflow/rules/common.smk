from pathlib import Path

from snakemake.utils import validate

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

MODEL_DIR = Path(config["model"])
MODEL = MODEL_DIR.name
TEXT_DIR = "resources/text"
# Texts the prepare_texts rule writes (lmkiln.data.texts.prepare_texts).
PREPARED_TEXTS = [
    "lee_news", "wiki_sample", "pride_and_prejudice", "emma", "mansfield_park", "northanger_abbey",
    "persuasion", "sense_and_sensibility",
]
GGUF_MODEL = Path(config["gguf"]["file"]).stem.split(".")[0]


wildcard_constraints:
    model=MODEL,


def model_files(wildcards=None):
    """Files of the model directory that the build depends on (config + weights)."""
    weights = sorted(MODEL_DIR.glob("*.safetensors")) if MODEL_DIR.is_dir() else []
    return [str(MODEL_DIR / "config.json")] + [str(w) for w in weights or [MODEL_DIR / "model.safetensors"]]


def text_input(name):
    """A calibration/eval source as a workflow input: prepared texts come from prepare_texts."""
    if name in PREPARED_TEXTS:
        return [f"{TEXT_DIR}/{name}.txt"]
    return [name] if Path(name).exists() else []


def device_flag():
    return f"--device {config['device']}" if config["device"] else ""


def quantize_targets():
    return [f"results/{MODEL}/awq", f"results/{MODEL}/eval/ppl.json", f"results/{MODEL}/packed"]


def print_summary():
    from lmkiln.report import quantize_summary

    print(quantize_summary(Path("results") / MODEL, Path("benchmarks") / MODEL))
