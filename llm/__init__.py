"""The OpenAI-compatible LLM client that the description job (`descriptions/`) and the evaluation's judge
(`evaluation/judge.py`) share: retries, validation and re-asks, a resumable cache, key redaction."""
