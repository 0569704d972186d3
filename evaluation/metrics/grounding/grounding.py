"""NanoVLM grounding as an `evaluate` metric: descriptions checked against built-in scenes' ground truth.

    import evaluate
    grounding = evaluate.load("evaluation/metrics/grounding")   # a local folder: works offline
    grounding.compute(predictions=["I see two red balls."], references=[scene_json])
    # {"object_recall": ..., "object_precision": ..., "chair_i": ..., "chair_s": ..., "attribute_accuracy": ...}

A reference is the scene as JSON (the `scene` column of `processing.scenes.scenes_dataset`).
Needs the nanovlm package installed (`pip install -e .`); the parser is `evaluation.grounding.ground_description`.
"""

import evaluation.metrics as metrics
from evaluation.grounding import grounding_scores


class Grounding(metrics.NanoVLMMetric):
    inputs_doc = "predictions: descriptions (str); references: their scenes as JSON (str)"
    input_types = {"predictions": "string", "references": "string"}

    def _compute(self, predictions, references):
        return grounding_scores(predictions, references)
