"""Publishing to the Hugging Face Hub: one command up (`hybridzoo push`), one line of transformers down.

`push_to_hub(model_dir, repo_id)` uploads a saved model or PEFT adapter folder in a single commit, with a generated
model card (`hybridzoo.model_card`). What is uploaded, if present:

    config.json, *.safetensors (+ index), generation_config.json, the remote code (*.py, checked against `auto_map`),
    tokenizer files, recipe.yaml, metrics.jsonl, loss_curve.png, eval/results.jsonl, eval/results.md, eval/*.png,
    eval/distillation.md and .json (`hybridzoo distill`'s report),
    adapter_config.json + adapter_model.safetensors (adapters), and README.md (the card).

Everything else (`checkpoints/`, TensorBoard logs, optimizer states) stays local. Only safetensors weights are
uploaded: a folder holding pickle weights (*.bin, *.pt, *.pth, *.pkl, *.ckpt) outside `checkpoints/` is refused.

The token comes from `token=`, else `HF_TOKEN`, else `hf auth login` (huggingface_hub's `get_token`), and is
scrubbed from every error message. Each Hub call is retried with exponential backoff on transient failures
(5xx, 429, dropped connections); the files go up in one commit, which the Hub applies all-or-nothing, so a failed
push leaves the repo as it was. `HF_ENDPOINT` is read when a push starts (huggingface_hub reads it only at import),
so a local Hub-compatible server (`hybridzoo.testing.local_hub`) can be targeted from the same process.

huggingface_hub's client (with its HTTP stack) and the card builder are imported inside the functions that use them,
not at the top: `hybridzoo push --help` declares its options from this module and must answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from hybridzoo.configs.settings import add_command, at_least, setting, takes_settings

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, HfApi, ModelCard

logger = logging.getLogger(__name__)
T = TypeVar("T")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
RUN_FILES = ("config.json", "generation_config.json", "recipe.yaml", "metrics.jsonl", "loss_curve.png",
             "model.safetensors.index.json", "adapter_config.json")
EVAL_FILES = ("results.jsonl", "results.md", "distillation.md", "distillation.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
LOCAL_ONLY_FOLDERS = ("checkpoints", "tensorboard", ".cache", ".git", "runs")  # runs/: distill stages
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class HubPushError(RuntimeError):
    """A push that could not be done; the message says what failed and what to do (and never holds the token)."""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    files: dict[str, int]  # path in repo → size in bytes
    card: ModelCard
    dry_run: bool = False
    commit_oid: str | None = None
    commit_url: str | None = None
    pull_request_url: str | None = None
    attempts: dict[str, int] = field(default_factory=dict)  # step → attempts it took


def collect_files(model_dir: Path) -> dict[str, Path]:
    """The files of `model_dir` that belong on the Hub (path in repo → local path); refuses pickle weights."""
    if not model_dir.is_dir():
        raise HubPushError(f"{model_dir} is not a folder; pass the output folder of a training run.")
    pickles = sorted(
        str(path.relative_to(model_dir)) for path in model_dir.rglob("*")
        if path.suffix in PICKLE_SUFFIXES and path.relative_to(model_dir).parts[0] not in LOCAL_ONLY_FOLDERS
    )
    if pickles:
        raise HubPushError(
            f"{model_dir} holds pickle weights {pickles}: only safetensors are uploaded, since loading a pickle runs "
            "arbitrary code. Re-save the model with `model.save_pretrained(folder)` (safetensors by default) and "
            "remove the pickle files."
        )
    is_adapter = (model_dir / "adapter_config.json").exists()
    required = ["adapter_config.json", "adapter_model.safetensors"] if is_adapter else ["config.json"]
    missing = [name for name in required if not (model_dir / name).exists()]
    weights = sorted(model_dir.glob("*.safetensors"))
    if missing or not weights:
        raise HubPushError(
            f"{model_dir} is not a saved model: it lacks {missing or ['*.safetensors weights']}. A model folder comes "
            "from `save_pretrained` (config.json + model.safetensors), an adapter folder from a PEFT model's "
            "`save_pretrained` (adapter_config.json + adapter_model.safetensors)."
        )
    for path in weights:
        _check_safetensors(path)
    files = {path.name: path for path in weights}
    names = RUN_FILES + TOKENIZER_FILES
    files.update({name: model_dir / name for name in names if (model_dir / name).is_file()})
    if not is_adapter:
        files.update(_remote_code(model_dir))
    eval_dir = model_dir / "eval"
    if eval_dir.is_dir():
        for path in sorted(eval_dir.iterdir()):
            if path.name in EVAL_FILES or path.suffix == ".png":
                files[f"eval/{path.name}"] = path
    return dict(sorted(files.items()))


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except (SafetensorError, OSError) as error:
        raise HubPushError(f"{path} is not a readable safetensors file ({error}); re-save the model.") from error


def _remote_code(model_dir: Path) -> dict[str, Path]:
    """The *.py files next to the weights; every module `auto_map` names must be among them (self-contained)."""
    config = json.loads((model_dir / "config.json").read_text())
    code = {path.name: path for path in sorted(model_dir.glob("*.py"))}
    modules = {reference.split(".")[0] for reference in (config.get("auto_map") or {}).values()
               if isinstance(reference, str) and "--" not in reference}  # "repo--module.Class" lives elsewhere
    missing = sorted(f"{module}.py" for module in modules if f"{module}.py" not in code)
    if not config.get("auto_map"):
        logger.warning("%s/config.json has no auto_map: the model will load only where hybridzoo is installed.",
                       model_dir)
    if missing:
        raise HubPushError(
            f"config.json's auto_map names {missing}, which are not in {model_dir}: the repo would not load with "
            "trust_remote_code=True. Re-save the model with `save_pretrained` (it copies the model code)."
        )
    return code


def _adapter_config(model_dir: Path, base_model: str | None) -> bytes | None:
    """adapter_config.json with `base_model_name_or_path` set to the Hub base model (None: upload it unchanged)."""
    path = model_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    if base_model is None or config.get("base_model_name_or_path") == base_model:
        return None
    config["base_model_name_or_path"] = base_model  # a local path would not resolve on anyone else's machine
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


class _Redactor:
    """Removes the token from text that may reach a user (error messages, logs)."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def __call__(self, text: str) -> str:
        return text.replace(self.token, "hf_***") if self.token else text


@contextmanager
def _redacted_logs(redact: _Redactor) -> Iterator[None]:
    """While pushing, scrub the token from every log record, whichever library logs it.

    The HTTP stack logs response headers at DEBUG level; a server that echoes credentials in an error would otherwise
    put the token in the user's logs. A record factory sees every record before any handler does.
    """
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        message = record.getMessage()
        if redact.token and redact.token in message:
            record.msg, record.args = redact(message), ()
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


def _is_transient(error: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    if isinstance(error, HfHubHTTPError):
        response = getattr(error, "response", None)
        return response is not None and response.status_code in TRANSIENT_STATUS
    return isinstance(error, (httpx.TransportError, httpx.TimeoutException, ConnectionError))


def _explain(error: Exception, step: str, repo_id: str) -> str:
    """What failed and what to do about it, for the errors a push can hit."""
    from huggingface_hub.errors import BadRequestError, RepositoryNotFoundError, RevisionNotFoundError

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, RepositoryNotFoundError) or status in (401, 403):
        return (f"{step} failed: the Hub refused access to {repo_id} ({status or 'not found'}). Check that the "
                "token is a write token for this namespace: set HF_TOKEN or run `hf auth login`.")
    if isinstance(error, RevisionNotFoundError):
        return f"{step} failed: that revision does not exist in {repo_id}. Check --revision."
    if isinstance(error, (BadRequestError, ValueError)):
        return f"{step} failed: the Hub rejected the request: {error}"
    if status == 412:
        return f"{step} failed: someone committed to {repo_id} meanwhile. Run the push again."
    return f"{step} failed: {type(error).__name__}: {error}"


def _with_retries(step: str, call: Callable[[], T], *, repo_id: str, redact: _Redactor, attempts: dict[str, int],
                  max_attempts: int, backoff_seconds: float) -> T:
    """Run `call`, retrying transient failures with exponential backoff (backoff_seconds, 2x, 4x, ..., at most 60 s)."""
    for attempt in range(1, max_attempts + 1):
        attempts[step] = attempt
        try:
            return call()
        except Exception as error:  # classified below; anything not transient is final
            if not _is_transient(error) or attempt == max_attempts:
                message = redact(_explain(error, step, repo_id))
                if _is_transient(error):
                    message += (f" (gave up after {attempt} attempts). Check your connection or the Hub's status and "
                                "run the same command again: files already on the Hub are skipped.")
                # `from None`: the chained original could carry the token in its text
                raise HubPushError(message) from None
            wait = min(backoff_seconds * 2 ** (attempt - 1), 60.0)
            logger.warning("%s", redact(f"{step} failed ({type(error).__name__}: {error}); retrying in {wait:.2f} s "
                                        f"(attempt {attempt + 1}/{max_attempts})"))
            time.sleep(wait)
    raise AssertionError("unreachable")


@dataclass
class PushSettings:
    """What `hybridzoo push` and `push_to_hub` take (the options of the command are generated from these fields)."""

    model_dir: str | Path = setting(help="a folder written by save_pretrained / a training recipe", positional=True)
    repo_id: str = setting(help="OWNER/NAME on the Hub")
    private: bool = setting(False, "create the repo private (if it does not exist)")
    revision: str | None = setting(None, "branch to commit to, created from main if missing (default: main)")
    create_pr: bool = setting(False, "open a pull request instead of committing")
    dry_run: bool = setting(False, "list the files and print the card; upload nothing")
    token: str | None = setting(None, "Hub token (default: HF_TOKEN or `hf auth login`)")
    base_model: str | None = setting(None, "Hub id of the base model (adapters, fine-tunes)")
    license: str = setting("apache-2.0", "licence id for the card")
    commit_message: str | None = setting(None, "the commit message (default: Upload FOLDER with hybridzoo)")
    max_attempts: int = setting(5, "tries of each Hub call on transient failures (5xx, 429, dropped connections)",
                                check=at_least(1))
    backoff_seconds: float = setting(1.0, "wait before the first retry, doubled for each next one (at most 60 s)",
                                     check=at_least(0))


@takes_settings(PushSettings)
def push_to_hub(settings: PushSettings) -> PushResult:
    """Upload a saved model or adapter folder to `repo_id` in one commit, creating the repo if needed.

    `revision`: a branch (created from main if missing). `create_pr`: open a pull request instead of committing to
    the branch. `dry_run`: build and check everything, upload nothing. `base_model`: the Hub id of the base model
    (adapters and fine-tunes); for an adapter it also replaces a local `base_model_name_or_path` in the uploaded
    adapter_config.json. Raises `HubPushError` with what failed and what to do. Takes a `PushSettings` or its fields
    as arguments: `push_to_hub(model_dir, repo_id, private=True)`.
    """
    from huggingface_hub import HfApi, get_token

    from hybridzoo import __version__
    from hybridzoo.model_card import ModelCardError, build_model_card, is_hub_repo_id

    folder, repo_id, token = Path(settings.model_dir), settings.repo_id, settings.token
    if not is_hub_repo_id(repo_id):
        raise HubPushError(f"{repo_id!r} is not a Hub repo id: use OWNER/NAME (your user name or an organisation).")
    files = collect_files(folder)
    try:
        card = build_model_card(folder, repo_id=repo_id, base_model=settings.base_model, license=settings.license)
    except ModelCardError as error:
        raise HubPushError(str(error)) from None
    contents: dict[str, Path | bytes] = dict(files)
    contents["README.md"] = str(card).encode()
    if "adapter_config.json" in files:
        rewritten = _adapter_config(folder, card.data.base_model)
        if rewritten is not None:
            contents["adapter_config.json"] = rewritten
    sizes = {path: len(data) if isinstance(data, bytes) else data.stat().st_size
             for path, data in sorted(contents.items())}
    branch = settings.revision or "main"
    result = PushResult(repo_id=repo_id, revision=branch, files=sizes, card=card, dry_run=settings.dry_run)
    if settings.dry_run:
        return result

    token = token or get_token()
    if not token:
        raise HubPushError("No Hugging Face token found: set HF_TOKEN, run `hf auth login`, or pass --token.")
    redact = _Redactor(token)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # None: huggingface_hub's default (read at its import)
    api = HfApi(endpoint=endpoint, token=token, library_name="hybridzoo", library_version=__version__)
    retry = dict(repo_id=repo_id, redact=redact, attempts=result.attempts, max_attempts=settings.max_attempts,
                 backoff_seconds=settings.backoff_seconds)
    with _redacted_logs(redact):
        info = _upload(api, folder, repo_id, branch, contents, settings.private, settings.create_pr,
                       settings.commit_message, retry)
    result.commit_oid, result.commit_url = info.oid, info.commit_url
    result.pull_request_url = info.pr_url
    logger.info("pushed %d files to %s@%s (commit %s)", len(contents), repo_id, branch, info.oid)
    return result


def _upload(api: HfApi, folder: Path, repo_id: str, branch: str, contents: dict[str, Path | bytes], private: bool,
            create_pr: bool, commit_message: str | None, retry: dict) -> CommitInfo:
    """Create the repo (and branch) if needed, then commit every file at once; each step retried on its own."""
    from huggingface_hub import CommitOperationAdd

    _with_retries("creating the repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True), **retry)
    if branch != "main":
        _with_retries(f"creating branch {branch!r}",
                      lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), **retry)

    def commit():
        # fresh operations on every attempt: huggingface_hub marks them with the state of the previous try
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data if isinstance(data, bytes)
                                         else str(data)) for path, data in sorted(contents.items())]
        return api.create_commit(repo_id, operations=operations, revision=branch, create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {folder.resolve().name} with hybridzoo")

    return _with_retries("uploading the files", commit, **retry)


def describe_push(result: PushResult) -> str:
    """A human summary: the file list, then the card (dry run) or where the commit went."""
    lines = [f"{'Would upload' if result.dry_run else 'Uploaded'} {len(result.files)} files to "
             f"{result.repo_id}@{result.revision}:"]
    lines += [f"  {path}  ({size:,} bytes)" for path, size in result.files.items()]
    if result.dry_run:
        lines += ["", "README.md (model card):", "", str(result.card)]
    elif result.pull_request_url:
        lines.append(f"Pull request: {result.pull_request_url}")
    else:
        lines.append(f"Commit: {result.commit_url}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """`hybridzoo push MODEL_DIR --repo-id OWNER/NAME [--private] [--revision B] [--create-pr] [--dry-run] ...`: the
    options are `PushSettings`' fields."""
    def run(settings: PushSettings) -> int:
        try:
            result = push_to_hub(settings)
        except HubPushError as error:
            print(f"hybridzoo push: {error}")
            return 1
        print(describe_push(result))
        return 0

    add_command(parser, PushSettings, run)
