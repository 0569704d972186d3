"""COCO caption metrics as an `evaluate` metric: BLEU-1..4, ROUGE-L and CIDEr-D (pycocoevalcap's scorers).

    import evaluate
    coco = evaluate.load("evaluation/metrics/caption_metrics")   # a local folder: works offline
    coco.compute(predictions=["a dog runs"], references=[["a dog is running", "a brown dog runs"]], tokenizer="simple")

`tokenizer`: "ptb" (COCO's, needs java), "simple" (pure Python) or "auto" (the default: ptb when
java is found). CIDEr-D's document frequencies come from the references passed in one call.
Needs the nanovlm package installed (`pip install -e .`): see `evaluation.caption_metrics`.
"""

import evaluation.metrics as metrics
from evaluation.caption_metrics import caption_scores


class CaptionMetrics(metrics.NanoVLMMetric):
    inputs_doc = "predictions: one caption per image (str); references: the image's captions (list of str)"
    input_types = {"predictions": "string", "references": "strings"}

    def _compute(self, predictions, references, tokenizer="auto", per_item=False):
        scores = caption_scores(predictions, references, tokenizer)
        return scores if per_item else {k: v for k, v in scores.items() if k != "per_item"}
