# Path helpers and params helpers: no logic beyond mapping config to file names and to what each
# rule's outputs depend on.
from mmsae.extract.subsample import fractions_of, is_subsampling
from mmsae.workflow.script_hash import script_hash
from mmsae.explain import endpoints
from mmsae.workflow.run_name import sae_settings

DEMO_MODEL_DIR = "results/models/demo"
ACTIVATIONS = "results/activations/manifest.json"
SAMPLES = "results/activations/samples.parquet"
IMAGES = "results/corpus/images.parquet"
PARTS = list(range(config["extract"]["parts"]))
# Shared by every SAE over this model and corpus: the model, corpora and activations (above). Per SAE
# (RUN = results/runs/<run_name>, set in the Snakefile): the SAE and everything downstream of it.
SAE_DIR = f"{RUN}/sae"
CODES_DIR = f"{RUN}/codes"
CODES = f"{CODES_DIR}/manifest.json"
CODE_SAMPLES = f"{CODES_DIR}/samples.parquet"
FEATURES = f"{RUN}/features"
MAPS = f"{FEATURES}/maps"
REPORT = f"{RUN}/report/index.html"
REPORT_PLOTS = f"{RUN}/report/plots"  # the report's figures as SVG and PNG files


def run_log(rule):
    """The log of an SAE-dependent rule, in its run folder."""
    return f"{RUN}/logs/{rule}.log"


def run_benchmark(rule):
    return f"{RUN}/benchmarks/{rule}.tsv"


def keys(section, *names):
    """The named keys of a config section: a rule's params carry exactly what its outputs depend on,
    so a new key must be added here by name to the rules that read it."""
    return {k: config[section][k] for k in names}


def extract_keys(*names):
    """``keys("extract", *names)`` without ``seed`` when extract.token_fraction keeps every token:
    the seed only draws the subsample, so changing it then reruns nothing."""
    out = keys("extract", *names)
    if not is_subsampling(fractions_of(config["extract"]["token_fraction"])):
        out.pop("seed", None)
    return out


def corpus_params(role, *names):
    """Named keys of corpus ``role`` (``train`` or ``interpret``) plus where its images come from:
    ``names`` for scikit-image photos, ``path`` for a folder or table (the other one does not affect
    the samples)."""
    c = config["corpus"][role]
    out = {"source": c["source"], **{k: c[k] for k in names}}
    out.update({"names": c["names"]} if c["source"] == "skimage" else {"path": c["path"]})
    return out


def script_hash_of(script):
    """Hash of the mmsae modules the rule's entry script imports (computed once, at load)."""
    return script_hash(f"{workflow.basedir}/workflow_scripts/{script}", workflow.basedir)


def is_demo_model():
    return config["model"]["source"] == "demo"


def model_path():
    """Directory or hub id that the model-running rules load."""
    return DEMO_MODEL_DIR if is_demo_model() else config["model"]["source"]


def model_input(wildcards):
    """The demo model directory when the run uses it; nothing for a hub id or an existing directory."""
    return [DEMO_MODEL_DIR] if is_demo_model() else []


EXPLANATIONS = f"{RUN}/explanations"


def explain_inputs(wildcards):
    """Maps, contexts and the selection; the local explainer's model directory when it is the demo."""
    inputs = {
        "maps": f"{MAPS}/maps.parquet",
        "contexts": f"{MAPS}/contexts.parquet",
        "selected": f"{FEATURES}/selected.json",
        "stats": f"{FEATURES}/stats.parquet",
        "top": f"{FEATURES}/top_samples.parquet",  # the shown contexts' token indices
    }
    if config["explain"]["server"] == "local" and explainer_local_model() == DEMO_MODEL_DIR:
        inputs["model"] = DEMO_MODEL_DIR
    return inputs


def explainer_local_model():
    return endpoints.explainer_local_model(config, model_path())


def explain_endpoint_params():
    """What the explanations depend on, secrets excluded (:mod:`mmsae.explain.endpoints`)."""
    return endpoints.explainer(config, model_path())


def explain_prompt_params():
    from mmsae.explain.prompts import prompt_params

    return prompt_params()


STEERING = f"{RUN}/steering"
NEURONS = "results/neurons"  # the model's neurons: no SAE, shared by every run
EVALUATION = f"{RUN}/evaluation"
ATTRIBUTION = f"{RUN}/attribution"
REPAIR = f"{RUN}/repair"


def steer_inputs(wildcards):
    """The model; the top text contexts and, when explanations run, the explanations: their words judge
    whether steering moved toward a feature (and ``steer.match`` chooses features by them)."""
    inputs = {"model": model_input(wildcards), "contexts": f"{MAPS}/contexts.parquet"}
    if config["explain"]["enabled"]:
        inputs["explanations"] = f"{EXPLANATIONS}/explanations.parquet"
    return inputs


def report_inputs(wildcards):
    inputs = {}
    if config["explain"]["enabled"]:
        inputs["explanations"] = f"{EXPLANATIONS}/explanations.parquet"
    if config["steer"]["enabled"]:
        inputs["steering"] = f"{STEERING}/steering.parquet"
    if config["attribution"]["enabled"]:
        inputs["attribution"] = f"{ATTRIBUTION}/summary.json"
    if config["repair"]["enabled"] and config["repair"]["cases"]:
        inputs["repair"] = f"{REPAIR}/repair.parquet"
    if config["loss_recovered"]["enabled"]:
        inputs["loss_recovered"] = f"{SAE_DIR}/loss_recovered.json"
    if config["evaluate"]["enabled"] and config["explain"]["enabled"]:
        inputs["evaluation"] = f"{EVALUATION}/summary.json"
    if config["scoring"]["enabled"] and config["explain"]["enabled"]:
        inputs["scoring"] = f"{EVALUATION}/scoring_summary.json"
        inputs["scoring_table"] = f"{EVALUATION}/scoring.parquet"
    if config["features"]["crossmodal"]["enabled"]:
        inputs["crossmodal"] = f"{FEATURES}/crossmodal.parquet"
        inputs["crossmodal_examples"] = f"{FEATURES}/crossmodal_examples.parquet"
    if config["neurons"]["enabled"]:
        inputs["neuron_properties"] = f"{NEURONS}/properties.json"
        inputs["neuron_captions"] = f"{NEURONS}/captions.parquet"
        inputs["neuron_table"] = f"{NEURONS}/neurons.parquet"
        inputs["neuron_tokens"] = f"{NEURONS}/tokens.parquet"
        inputs["edits"] = f"{NEURONS}/edits/edits.parquet"
    if config["export"]["enabled"]:
        inputs["export"] = f"{EXPORT}/neuronpedia"  # the top logits of the text-feature cards
    return inputs


def refiner_endpoint_params():
    return endpoints.refiner(config, model_path())


def categorizer_endpoint_params():
    return endpoints.categorizer(config, model_path())


def refine_inputs(wildcards):
    uses = [refiner_endpoint_params(), categorizer_endpoint_params()]
    return {"model": DEMO_MODEL_DIR} if any(endpoints.uses_local_model(e, DEMO_MODEL_DIR) for e in uses) else {}


def refine_prompt_params():
    from mmsae.evaluate.refine import prompt_params

    return prompt_params()


def scorer_endpoint_params():
    return endpoints.scorer(config, model_path())


def scoring_inputs(wildcards):
    """What detection/fuzzing scoring reads: the explanations, the top contexts and maps, the codes and
    samples they come from (corpus.interpret; negatives are drawn there; the codes manifest gives the grid side); the
    refined categories when the evaluation runs; the local scorer's model directory when it is the demo."""
    inputs = {
        "explanations": f"{EXPLANATIONS}/explanations.parquet",
        "contexts": f"{MAPS}/contexts.parquet",
        "maps": f"{MAPS}/maps.parquet",
        "codes": CODES,  # its manifest also gives the grid side
        "samples": CODE_SAMPLES,  # the interpretation corpus's samples
    }
    if config["evaluate"]["enabled"]:
        inputs["refined"] = f"{EVALUATION}/refined.parquet"
    if endpoints.uses_local_model(scorer_endpoint_params(), DEMO_MODEL_DIR):
        inputs["model"] = DEMO_MODEL_DIR
    return inputs


def scoring_prompt_params():
    from mmsae.evaluate.scoring_prompts import prompt_params

    return prompt_params(config["scoring"]["prompts"], config["scoring"]["mode"])


def train_sae_inputs(wildcards):
    """sae.source cache: the activation manifest and samples table (the held-out split groups samples by
    image, read beside the manifest); online: the model (the demo's directory, nothing for a hub id)."""
    if config["sae"]["source"] == "online":
        return {"model": model_input(wildcards)}
    return {"activations": ACTIVATIONS, "samples": SAMPLES}


def train_sae_online_params():
    """Online, what the activations depend on (extraction's keys); nothing when training reads the cache."""
    if config["sae"]["source"] != "online":
        return {}
    return {
        "model": model_path(),
        "dtype": config["model"]["dtype"],
        "hook_point": config["model"]["hook_point"],
        "corpus": corpus_params("train", "prompts", "text_prompts", "max_images", "text_source"),
        "extract": extract_keys("batch_size", "max_image_pixels", "token_fraction", "seed"),
    }


EXPORT = f"{RUN}/export"


def export_targets():
    """The export folders when export.enabled, else nothing (rule all requests them)."""
    return [f"{EXPORT}/neuronpedia", f"{EXPORT}/hub"] if config["export"]["enabled"] else []


def export_inputs(wildcards):
    """Explanations and their scores when those rules run; loss recovered when it runs."""
    inputs = {}
    if config["explain"]["enabled"]:
        inputs["explanations"] = f"{EXPLANATIONS}/explanations.parquet"
        if config["scoring"]["enabled"]:
            inputs["scoring"] = f"{EVALUATION}/scoring.parquet"
    if config["loss_recovered"]["enabled"]:
        inputs["loss_recovered"] = f"{SAE_DIR}/loss_recovered.json"
    return inputs
