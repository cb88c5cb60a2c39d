"""`vamos <stage>`: the thin command line that dvc.yaml calls, plus `vamos translate`."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer

from pipeline.tracking import offline_environment

offline_environment()
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="vamos: train, evaluate, register and use a translator (English->Spanish by default).")
PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="the params file")

# How `vamos <stage>` exits, by cause. The Prefect flow (flows/pipeline_flow.py) retries by these codes alone.
EXIT_CRASH = 1  # a bug or another unexpected failure: the traceback is printed; retrying would fail alike
EXIT_BAD_INPUT = 2  # bad params or bad input; the message names the key or the file; not retried
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL (sysexits.h): a lock or a busy database; retried with back-off


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, console=_stderr_console())])
    for noisy in ("gensim", "alembic", "mlflow", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _run_stage(name: str, params_file: Path) -> None:
    from pipeline.config import InputError, load_params
    from pipeline.stages import STAGES

    _setup_logging()
    try:
        params = load_params(params_file)
        STAGES[name](params)
    except (InputError, FileNotFoundError) as e:
        _stderr_console().print(f"[bold red]vamos {name}: error:[/] {e}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except Exception as e:  # noqa: BLE001 - every other failure leaves with its traceback and a code by cause
        import traceback

        traceback.print_exc()
        if is_temporary(e):
            _stderr_console().print(f"[bold red]vamos {name}: busy:[/] {e} (a lock or a busy database: "
                                    f"exit {EXIT_TEMPFAIL}, try again later)")
            raise typer.Exit(EXIT_TEMPFAIL) from None
        _stderr_console().print(f"[bold red]vamos {name}: crashed:[/] {type(e).__name__}: {e}")
        raise typer.Exit(EXIT_CRASH) from None


def is_temporary(error: BaseException) -> bool:
    """A lock held by another process or a busy database, anywhere in the exception's chain: SQLite's
    SQLITE_BUSY/SQLITE_LOCKED (also as SQLAlchemy's or MLflow's wrapper of it), MLflow's
    TEMPORARILY_UNAVAILABLE, DVC's LockError, a file lock's timeout."""
    import sqlite3

    from filelock import Timeout  # its module moved in filelock 4 (filelock._error -> filelock._core._errors)

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, sqlite3.OperationalError):
            code = getattr(error, "sqlite_errorname", "")  # Python 3.11+
            if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or (
                    not code and ("database is locked" in str(error) or "database is busy" in str(error))):
                return True
        if getattr(error, "error_code", None) == "TEMPORARILY_UNAVAILABLE":  # MlflowException
            return True
        kind = f"{type(error).__module__}.{type(error).__qualname__}"
        if isinstance(error, Timeout) or kind in ("dvc.lock.LockError", "zc.lockfile.LockError"):
            return True
        orig = getattr(error, "orig", None)  # sqlalchemy.exc.DBAPIError holds the driver's exception
        error = orig if isinstance(orig, BaseException) and id(orig) not in seen else (error.__cause__ or error.__context__)
    return False


def _stage_command(name: str, doc: str) -> None:
    def command(params: Path = PARAMS) -> None:
        _run_stage(name, params)

    command.__doc__ = doc
    app.command(name)(command)


for _name, _doc in [
    ("ingest", "Read the corpus sources, clean them, and count every dropped pair by reason."),
    ("prepare", "Tokenise, split by a hash of the pair id, and build the vocabularies."),
    ("embed", "Train word2vec embeddings for each language and evaluate them."),
    ("train", "Train the LSTM encoder-decoder with attention (resumes from its last checkpoint)."),
    ("evaluate", "Score the test split with sacrebleu (BLEU, chrF, TER), greedy and beam."),
    ("register", "Log the model to MLflow, register it, and move the champion/challenger alias."),
]:
    _stage_command(_name, _doc)


@app.command()
def check(params: Path = PARAMS) -> None:
    """Validate the params file and print it resolved."""
    from pipeline.config import ParamsError, load_params

    try:
        typer.echo(load_params(params).model_dump_json(indent=2, by_alias=True))
    except ParamsError as e:
        _stderr_console().print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


@app.command()
def push(project: Path = typer.Option(Path("."), help="the DVC project")) -> None:
    """Push data and models (every output in dvc.lock) to the default DVC remote (see .dvc/config)."""
    from pipeline.storage import NoRemote, default_remote
    from pipeline.storage import push as dvc_push

    try:
        name, url = default_remote(project)
    except NoRemote as e:
        _stderr_console().print(f"[bold red]vamos push: error:[/] {e}")
        raise typer.Exit(2) from None
    result = dvc_push(project)
    sys.stderr.write(result.stderr)
    typer.echo(result.stdout.rstrip("\n"))
    if result.returncode != 0:
        raise typer.Exit(result.returncode)
    typer.echo(f"pushed to DVC remote {name!r} ({url})")


@app.command()
def restore(
    version: int = typer.Argument(..., help="the registered version of the model to restore"),
    into: Path = typer.Option(..., "--into", help="an empty folder for the restored checkout (a git worktree)"),
    params: Path = PARAMS,
) -> None:
    """Restore a registered version: its commit, its dvc.lock, and its data and model from the DVC remote."""
    from pipeline.config import ParamsError, load_params
    from pipeline.restore import RestoreError, restore as restore_version

    _setup_logging()
    try:
        result = restore_version(load_params(params), version, into)
    except (ParamsError, RestoreError) as e:
        _stderr_console().print(f"[bold red]vamos restore: error:[/] {e}")
        raise typer.Exit(2) from None
    typer.echo(f"restored version {result['version']} (commit {result['git_commit'][:10]}) into {result['path']}; "
               f"model md5 {result['model_md5']} matches the registry")


@app.command()
def translate(
    text: Optional[list[str]] = typer.Argument(None, help="text in the source language; none: read --input or stdin"),
    model: str = typer.Option("champion", "--model", "-m",
                              help="a registry alias (champion), a version number, a models:/ URI, or a model.pt file"),
    beam: Optional[int] = typer.Option(None, "--beam", "-b", help="beam size, 1 to 16 (default: the model's)"),
    input_file: Optional[Path] = typer.Option(None, "--input", "-i", help="a UTF-8 text file: one line in, one line out"),
    output_file: Optional[Path] = typer.Option(None, "--output", "-o", help="write the translation here (atomically)"),
    paragraphs: bool = typer.Option(False, "--paragraphs",
                                    help="split every line into sentences, translate each, and rejoin them"),
    attention: Optional[Path] = typer.Option(None, "--attention", help="save the attention heatmap of one sentence (PNG)"),
    params: Path = PARAMS,
) -> None:
    """Translate with the registered champion of the params' pair (or any model). A line longer than
    serve.max_sentence_tokens is split into sentences; a sentence still longer is an error."""
    from pipeline.config import ParamsError
    from pipeline.serving import ModelNotFound, RequestError

    logging.basicConfig(level=logging.WARNING)
    try:
        lines = _translate_input(text, input_file)
        translator = _open_translator(model, params)
        if attention:
            outputs = [_plot_attention(translator, lines, beam, paragraphs, attention)]
        else:
            outputs = translator.translate_document(lines, beam, paragraphs, progress=input_file is not None)
    except (ParamsError, ModelNotFound, RequestError, TranslateInputError) as e:
        _fail(f"vamos translate: {e}")
    _write_lines(outputs, output_file)


@app.command()
def ensemble(
    models: list[Path] = typer.Argument(..., help="saved models (model.pt files) trained on the same prepared data"),
    output: Path = typer.Option(..., "--output", "-o", help="the ensemble's model file (written atomically)"),
) -> None:
    """Pack models into one model file that decodes as their ensemble (their next-word
    log-probabilities averaged at every step): for `vamos translate --model`, benchmarks/score.py
    and serving. Each member costs its own decoding time and memory. Models trained with
    train.right_to_left, packed beside left-to-right ones, rerank the beam's n-best list instead."""
    from pipeline.model import NotAModel, pack_ensemble

    try:
        count = pack_ensemble(models, output)
    except (NotAModel, FileNotFoundError, ValueError) as e:
        _fail(f"vamos ensemble: {e}")
    typer.echo(f"wrote {output}: an ensemble of {count} models")


class TranslateInputError(ValueError):
    """Nothing to translate, or a file that cannot be read."""


def _translate_input(text: Optional[list[str]], input_file: Optional[Path]) -> list[str]:
    if text and input_file:
        raise TranslateInputError("give text as arguments or --input FILE, not both")
    if input_file:
        lines = _read_lines(input_file)
    elif text:
        lines = list(text)
    elif sys.stdin.isatty():  # reading would wait for a user who does not know it
        raise TranslateInputError("nothing to translate: pass text as arguments, --input FILE, or pipe it on stdin")
    else:
        lines = sys.stdin.read().splitlines()
    if not any(line.strip() for line in lines):
        raise TranslateInputError(f"empty input{f' ({input_file})' if input_file else ''}: nothing to translate")
    return lines


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TranslateInputError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TranslateInputError(f"cannot read {path}: {e}") from None


def _open_translator(model: str, params_file: Path):
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from pipeline.config import Params, load_params
    from pipeline.serving import open_translator

    # Outside a project there is no params.yaml: the registry name and limits keep their defaults.
    params = load_params(params_file) if params_file.exists() else Params()
    return open_translator(model, params)


def _plot_attention(translator, lines: list[str], beam: Optional[int], paragraphs: bool, path: Path) -> str:
    from pipeline.evaluate import plot_attention

    if len(lines) != 1:
        raise TranslateInputError(f"--attention needs a single sentence; got {len(lines)} lines")
    source, words, weights, translation = translator.translate_with_attention(lines[0], beam, paragraphs)
    plot_attention(source, words, weights, path, translation)
    return translation


def _write_lines(lines: list[str], output_file: Optional[Path]) -> None:
    from pipeline import storage

    if output_file:
        storage.write_text(output_file, "".join(f"{line}\n" for line in lines))
    else:
        for line in lines:
            typer.echo(line)


def _fail(message: str) -> NoReturn:
    from rich.markup import escape

    _stderr_console().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def main() -> None:
    """The `vamos` command. `vamos train` first re-executes itself under tcmalloc (pipeline/allocator.py)."""
    if sys.argv[1:2] == ["train"]:
        from pipeline.allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc()
    app()


if __name__ == "__main__":
    main()
