"""ROUGE novelty as an `evaluate` metric: each text's highest ROUGE-1 / ROUGE-L F1 against all
training texts (exact, with an inverted index; see `evaluation.novelty`), and distinct-1/2.

    import evaluate
    novelty = evaluate.load("evaluation/metrics/rouge_novelty")   # a local folder: works offline
    novelty.compute(predictions=["I see a red ball."], training_texts=train_texts)
    # {"rouge1_max_mean": ..., "rougeL_max_mean": ..., "copied": ..., "distinct_1": ..., "distinct_2": ...}

Needs the nanovlm package installed (`pip install -e .`).
"""

import evaluation.metrics as metrics
from evaluation.novelty import novelty_scores


class RougeNovelty(metrics.NanoVLMMetric):
    inputs_doc = "predictions: generated texts (str); training_texts: the corpus to compare with (list of str)"
    input_types = {"predictions": "string"}

    def _compute(self, predictions, training_texts, per_item=False):
        scores = novelty_scores(predictions, training_texts)
        return scores if per_item else {k: v for k, v in scores.items() if k != "per_item"}
