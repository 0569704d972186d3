"""The paper's LLM judge as an `evaluate` metric: an OpenAI-compatible LLM grades completions of
description beginnings for grammar, consistency, creativity, meaningfulness and plot (1-10 each).

    import evaluate
    judge = evaluate.load("evaluation/metrics/llm_judge")   # a local folder: works offline
    judge.compute(predictions=["a red ball. It is big."], references=["I see"], judge_model="gpt-4o",
                  cache="judge_cache.jsonl")   # + base_url="http://127.0.0.1:8000/v1" for a local server
    # {"grammar": {"mean": ..., "ci95": ..., "sd": ..., "n": ...}, ..., "average": {...}, "graded": 1, "failed": 0}

predictions are the completions, references the beginnings they complete. Grades are cached in
`cache` (a JSONL file). The key comes from $OPENAI_API_KEY (or `api_key_env`). See `evaluation.judge`.
Needs the nanovlm package installed (`pip install -e .`).
"""

import evaluation.metrics as metrics
from evaluation.judge import JudgeSettings, judge


class LLMJudge(metrics.NanoVLMMetric):
    inputs_doc = "predictions: completions (str); references: the beginnings they complete (str)"
    input_types = {"predictions": "string", "references": "string"}

    def _compute(self, predictions, references, judge_model, cache, base_url=None, **settings):
        result = judge({"texts": list(zip(references, predictions))}, JudgeSettings(judge_model, base_url, **settings), cache)
        return result["summary"]["texts"] | {"format": result["format"]}
