"""The paper's description job: turn each image's human captions into one child-like ShortDesc or LongDesc
with an LLM on any OpenAI-compatible server (`python -m descriptions.build`; its prompts in `prompts.py`)."""
