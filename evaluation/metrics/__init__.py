"""The evaluation's metrics as `evaluate` modules: each folder here loads offline with
`evaluate.load("evaluation/metrics/<name>")` (grounding, caption_metrics, rouge_novelty, llm_judge)
once the nanovlm package is installed. They share `NanoVLMMetric`; the scripts import it as
`evaluation.metrics` (not the class itself: `evaluate.load` takes the first metric class it finds
in a script's namespace)."""

import sys

import datasets
import evaluate

_TYPES = {"string": datasets.Value("string"), "strings": datasets.Sequence(datasets.Value("string"))}


class NanoVLMMetric(evaluate.Metric):
    """An `evaluate.Metric` described by class fields: `inputs_doc` (what the inputs are) and
    `input_types` ({name: "string" or "strings"}); its description is its script's docstring."""

    inputs_doc = ""
    input_types: dict = {}

    def _info(self):
        return evaluate.MetricInfo(
            description=sys.modules[type(self).__module__].__doc__ or "",
            citation="",
            inputs_description=self.inputs_doc,
            features=datasets.Features({name: _TYPES[kind] for name, kind in self.input_types.items()}),
        )
