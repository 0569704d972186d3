"""How to reach and pace an OpenAI-compatible server: `ClientSettings`, the settings the description builder and
the judge share; `client_arguments(prefix)` declares them as command-line flags (`--model` ..., `--judge_model` ...)
and `client_settings(args, prefix)` reads them back; `arg` is the flag helper of both CLIs."""

from dataclasses import dataclass, field, fields, make_dataclass

from .client import LLMClient


def arg(default=None, help=None, **kwargs):
    """A dataclass field that HfArgumentParser turns into a flag: its default and --help text, and any
    argparse extras (choices, metavar)."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ClientSettings:
    """How to reach and pace an OpenAI-compatible server: the settings the description builder and
    the evaluation's judge share (`LLMClient`'s arguments)."""

    model: str | None = arg(help="model name as the server knows it (the paper: gpt-4o)")
    base_url: str | None = arg(help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)")
    api_key_env: str = arg("OPENAI_API_KEY", "environment variable holding the API key")
    concurrency: int = arg(8, "requests in flight at once")
    timeout: float = arg(60.0, "seconds before a request counts as failed (and is retried)")
    max_attempts: int = arg(6, "HTTP requests per item at most, retries and re-asks included")
    backoff_base: float = arg(1.0, "first retry waits about this many seconds, doubling after")
    backoff_max: float = arg(60.0, "longest wait between retries (Retry-After aside)")

    def client(self, flag_prefix: str = "", max_attempts: int | None = None, concurrency: int | None = None) -> LLMClient:
        """A client with these settings; `flag_prefix` names the flags its errors point to (--judge_model ...)."""
        return LLMClient(self.model, self.base_url, self.api_key_env, concurrency or self.concurrency, self.timeout,
                         max_attempts or self.max_attempts, self.backoff_base, self.backoff_max, flag_prefix=flag_prefix)


def client_arguments(prefix: str, group: str, **defaults) -> type:
    """`ClientSettings` as an HfArgumentParser dataclass whose flags are `--{prefix}{name}` (in an
    argument group named `group`), with `defaults` replacing the shared ones."""
    specs = []
    for f in fields(ClientSettings):
        specs.append((prefix + f.name, f.type, arg(defaults.get(f.name, f.default), f.metadata["help"])))
    return make_dataclass(f"{prefix.strip('_').title()}ClientArguments", specs, namespace={"_argument_group_name": group})


def client_settings(args, prefix: str = "") -> dict:
    """The `ClientSettings` fields of a parsed namespace whose flags `client_arguments(prefix)` declared."""
    return {f.name: getattr(args, prefix + f.name) for f in fields(ClientSettings)}
