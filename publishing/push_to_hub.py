"""Share a trained NanoVLM on the Hugging Face Hub, with a model card written from its measurements.

    python -m publishing.push_to_hub outputs/nanovlm-mini-scenes --repo_id ORG/NAME
    python -m publishing.push_to_hub outputs/nanovlm-mini-scenes --repo_id ORG/NAME --dry_run   # card + files, no push
    python train.py --push_to_hub --hub_model_id ORG/NAME ...       # the same push at the end of training

Pushed, as one commit: the weights (safetensors), config and generation config, the processor
(tokenizer, image processor, chat template), the three Hub code files, arguments.json /
metrics.json / report.json, samples.png / loss_curve.png, the ONNX export when the folder holds one
(`onnx/*.onnx` from `python -m modeling_nanovlm.export_onnx FOLDER`, under `onnx/` in the repo as SmolVLM's repos
keep it: what web/ and transformers.js load), and README.md: the model card
(`publishing/model_card.py`; written to the folder's README.md, as train.py does). Checkpoints, samples.jsonl and training_args.bin (a pickle that
holds `--hub_token` in clear) stay home. Pushing again updates the repo; unchanged files are not
uploaded again.

The token is read where huggingface_hub reads it (HF_TOKEN, then the file `hf auth login` wrote);
`train.py --hub_token` overrides it. It is never logged, and a push that would upload it in a file
stops. HF_ENDPOINT selects another Hub-compatible server.
"""

import contextlib
from dataclasses import dataclass, field
import fnmatch
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from publishing.model_card import model_card, write_model_card

logger = logging.getLogger(__name__)

HUB_CODE = ("configuration_nanovlm.py", "modeling_nanovlm.py", "processing_nanovlm.py")
REQUIRED = ("config.json", "tokenizer.json", "processor_config.json", *HUB_CODE)
PUSHED = (
    *REQUIRED, "*.safetensors", "model.safetensors.index.json", "generation_config.json", "tokenizer_config.json",
    "special_tokens_map.json", "preprocessor_config.json", "chat_template.jinja",
    "arguments.json", "metrics.json", "report.json", "samples.png", "loss_curve.png",
)
ONNX_FILES = ("vision_encoder", "embed_tokens", "decoder_model_merged")  # modeling_nanovlm/export_onnx.py's FILES
ONNX_PUSHED = ("*.onnx", "*.onnx.data", "*.onnx_data")  # the graphs, and the weights of one stored apart (over 2 GB)


class PushError(RuntimeError):
    """A push that cannot happen, with what to do about it."""


def files_to_push(folder: Path) -> list[Path]:
    """The files of a saved NanoVLM output folder that go to the Hub (README.md is generated), the ONNX export's
    under onnx/ included."""
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder; pass a train.py output folder")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.insert(0, "model.safetensors")
    if missing:
        raise PushError(f"{folder} is not a saved NanoVLM: missing {', '.join(missing)} (train.py writes them when training ends)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in PUSHED))
    return files + _onnx_files(folder)


def _onnx_files(folder: Path) -> list[Path]:
    """The files of the folder's ONNX export (none without an onnx/ folder). An export that lacks one of the three
    fp32 files would give a repo the page cannot load: it stops the push. Files older than the weights may describe
    an earlier model (or only come from a copy that did not keep the times): a warning says so."""
    onnx_dir = folder / "onnx"
    if not onnx_dir.is_dir():
        return []
    files = sorted(p for p in onnx_dir.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in ONNX_PUSHED))
    export = f"python -m modeling_nanovlm.export_onnx {folder}"
    if missing := [f"{name}.onnx" for name in ONNX_FILES if not (onnx_dir / f"{name}.onnx").is_file()]:
        raise PushError(f"{onnx_dir} lacks {', '.join(missing)}: export again with `{export}`, or remove {onnx_dir}")
    weights = max(p.stat().st_mtime for p in folder.glob("*.safetensors"))
    if stale := [p.name for p in files if p.stat().st_mtime < weights]:
        logger.warning("%s holds %s, older than the weights: if the model was trained further since, export again "
                       "with `%s` before pushing", onnx_dir, ", ".join(stale), export)
    return files


def _check_token_absent(token: str, contents: dict[str, bytes]) -> None:
    for name, content in contents.items():
        if token.encode() in content:
            raise PushError(f"{name} contains your Hub token; nothing was pushed. Remove it from the file first")


@contextlib.contextmanager
def _hub_errors(repo_id: str, token: str) -> Iterator[None]:
    """Turn huggingface_hub's failures into one-line errors that say what to check (and never show the token)."""
    try:
        yield
    except Exception as err:
        message = _explain(err, repo_id, constants.ENDPOINT)
        if message is None:
            raise
        raise PushError(message.replace(token, "<token>")) from None


def _explain(err: Exception, repo_id: str, endpoint: str) -> str | None:
    if isinstance(err, HFValidationError):
        return f"{repo_id!r} is not a valid Hub repo name ({err}); use ORG/NAME or NAME"
    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to push"
    if isinstance(err, RepositoryNotFoundError):
        return f"repo {repo_id} not found at {endpoint}, or your token cannot see it: {_first_line(err)}"
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        hint = {401: "; the Hub refused the token: check it with `hf auth whoami`",
                403: f"; your token cannot write to {repo_id.split('/')[0]!r}: check the repo name and the token's rights"}
        return f"push to {repo_id} at {endpoint} failed: {_first_line(err)}{hint.get(status, '')}"
    # httpx / httpx2 (whichever huggingface_hub uses) raise TransportError subclasses when a server is unreachable
    if isinstance(err, (ConnectionError, TimeoutError)) or any(c.__name__ == "TransportError" for c in type(err).__mro__):
        return f"cannot reach the Hub at {endpoint} ({type(err).__name__}: {err}); check the network or HF_ENDPOINT"
    return None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__


def _resolve_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)")
    return token


def create_repo(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Create `repo_id` if needed; returns its full id (a bare NAME lands in the token owner's namespace)."""
    token = _resolve_token(token)
    with _hub_errors(repo_id, token):
        return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


def push_output(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    license: str = "apache-2.0",
) -> CommitInfo:
    """Push a train.py output folder and its generated model card to `repo_id` as one commit."""
    folder = Path(folder)
    token = _resolve_token(token)
    files = files_to_push(folder)
    names = [p.relative_to(folder).as_posix() for p in files]  # onnx/x.onnx: the path in the repo too
    _check_token_absent(token, {name: p.read_bytes() for name, p in zip(names, files)})
    repo_id = create_repo(repo_id, token, private)
    card = write_model_card(folder, repo_id, license=license)  # the folder's README.md, now naming the repo
    _check_token_absent(token, {"README.md": card.read_bytes()})
    logger.info("pushing %d files from %s to %s at %s", len(files) + 1, folder, repo_id, constants.ENDPOINT)
    with _hub_errors(repo_id, token):
        info = HfApi(token=token).upload_folder(
            repo_id=repo_id, folder_path=folder, allow_patterns=names + ["README.md"],
            commit_message=commit_message or f"Upload NanoVLM from {folder.name}", revision=revision,
        )
    logger.info("pushed: %s", info.commit_url)
    return info


def take_over_trainer_push(args: TrainingArguments) -> str | None:
    """`train.py --push_to_hub`: create the repo before training, and leave the push to `push_output`.

    A wrong name, token or endpoint then fails in seconds rather than after training. The Trainer's
    own pushes are turned off: they would upload every checkpoint, training_args.bin and a card
    without the run's measurements. Returns the repo id (None without --push_to_hub).
    """
    if not args.push_to_hub:
        return None
    args.push_to_hub = False
    name = args.hub_model_id or Path(args.output_dir).absolute().name  # the Trainer's default name
    if args.process_index != 0:
        return name
    try:
        repo_id = create_repo(name, args.hub_token, args.hub_private_repo)
    except PushError as err:
        raise SystemExit(f"--push_to_hub: {err}") from None
    logger.info("will push to %s at %s when training ends", repo_id, constants.ENDPOINT)
    return repo_id


class PushCheckpoints(TrainerCallback):
    """`train.py --push_to_hub --hub_strategy checkpoint` (or `all_checkpoints`): after every save, the checkpoint
    goes to the repo as `last-checkpoint/` (replacing the one before) or as `checkpoint-N/`, so a run that stops
    can resume on another machine (`hf download REPO --include "last-checkpoint/*"`, then
    `--resume_from_checkpoint`). As in the final push: not training_args.bin (it holds the token), every file
    checked for the token. A failed upload is logged and training goes on; the final push reports its own."""

    def __init__(self, repo_id: str, token: str | None, revision: str | None, strategy: str):
        self.repo_id, self.token, self.revision, self.strategy = repo_id, _resolve_token(token), revision, strategy

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "training_args.bin")
        path_in_repo = "last-checkpoint" if self.strategy == "checkpoint" else folder.name
        try:
            _check_token_absent(self.token, {p.name: p.read_bytes() for p in files})
            with _hub_errors(self.repo_id, self.token):
                HfApi(token=self.token).upload_folder(
                    repo_id=self.repo_id, folder_path=folder, path_in_repo=path_in_repo, allow_patterns=[p.name for p in files],
                    delete_patterns=["*"] if path_in_repo == "last-checkpoint" else None, revision=self.revision,
                    commit_message=f"Checkpoint at step {state.global_step}",
                )
        except PushError as err:
            logger.warning("checkpoint %s was not pushed (training goes on): %s", folder.name, err)
            return
        logger.info("pushed %s to %s/%s", folder.name, self.repo_id, path_in_repo)


def checkpoint_pusher(args: TrainingArguments, repo_id: str | None) -> list[TrainerCallback]:
    """The callbacks for `--hub_strategy`: PushCheckpoints for checkpoint / all_checkpoints, none for end / every_save
    (every_save would push the unfinished model's folder; train.py pushes the finished one at the end)."""
    strategy = str(getattr(args.hub_strategy, "value", args.hub_strategy))
    if repo_id is None or strategy not in ("checkpoint", "all_checkpoints"):
        return []
    return [PushCheckpoints(repo_id, args.hub_token, args.hub_revision, strategy)]


def push_after_training(args: TrainingArguments, repo_id: str) -> None:
    """The end of `train.py --push_to_hub`: push the output folder; on failure say how to retry without training."""
    try:
        push_output(args.output_dir, repo_id, token=args.hub_token, revision=args.hub_revision)
    except PushError as err:
        raise SystemExit(f"{err}\nThe trained model is saved in {args.output_dir}; push it with "
                         f"`python -m publishing.push_to_hub {args.output_dir} --repo_id {repo_id}`") from None


@dataclass
class PushArguments:
    repo_id: str = field(metadata={"help": "ORG/NAME (or NAME: your own namespace)"})
    private: bool = field(default=False, metadata={"help": "create the repo private (an existing repo keeps its visibility)"})
    revision: str | None = field(default=None, metadata={"help": "branch to push to (default: main)"})
    commit_message: str | None = field(default=None, metadata={"help": "default: Upload NanoVLM from FOLDER"})
    license: str = field(default="apache-2.0", metadata={"help": "license in the card's metadata (mind the training data's)"})
    dry_run: bool = field(default=False, metadata={"help": "print the model card and the files that would go up; push nothing"})


def parse_args(argv: list[str] | None) -> PushArguments:
    """PushArguments plus the positional output folder (`args.output_dir`)."""
    parser = HfArgumentParser(PushArguments, description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="a train.py output folder")
    args, rest = parser.parse_args_into_dataclasses(args=argv)
    args.output_dir = rest.output_dir
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if args.dry_run:
            files = files_to_push(Path(args.output_dir))
            print(model_card(args.output_dir, args.repo_id, license=args.license))
            print(f"\n<!-- would push: README.md, {', '.join(p.relative_to(Path(args.output_dir)).as_posix() for p in files)} -->")
        else:
            push_output(args.output_dir, args.repo_id, private=args.private or None, revision=args.revision,
                        commit_message=args.commit_message, license=args.license)
    except PushError as err:
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
