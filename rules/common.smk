# Path helpers only: no logic beyond mapping config to file names.

DEMO_MODEL_DIR = "results/models/demo"
ACTIVATIONS = "results/activations/manifest.json"
SAE_DIR = f"results/sae/{config['sae']['name']}"
CODES = "results/codes/manifest.json"
FEATURES = "results/features"
MAPS = "results/features/maps"


def is_demo_model():
    return config["model"]["source"] == "demo"


def model_path():
    """Directory or hub id that the model-running rules load."""
    return DEMO_MODEL_DIR if is_demo_model() else config["model"]["source"]


def model_input(wildcards):
    """The demo model directory when the run uses it; nothing for a hub id or an existing directory."""
    return [DEMO_MODEL_DIR] if is_demo_model() else []
