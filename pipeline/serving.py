"""The MLflow pyfunc translator (list of English strings in, list of Spanish strings out), the
limits every entry point enforces, and `log_translator`, which logs it as "models from code".

The logged model is `translator_model.py` (it calls `mlflow.models.set_model`) with the search
settings and limits in its `model_config`, the checkpoint (weights, vocabularies, tokeniser
settings; loaded with `weights_only=True`) as an artifact, and this `pipeline` package as code:
nothing is pickled, and neither word2vec files nor this checkout are needed to load it.

Limits, the same for the pyfunc, REST and `vamos translate`: a line longer than
`max_sentence_tokens` is split into sentences (pysbd); a sentence that is still longer is
rejected with an error naming the limit, never cut or translated in pieces (a translation of
fragments would look fine and be wrong); at most `max_sentences` sentences per request; a blank
line gives "" without decoding; `beam_size` is an integer from 1 to 16."""
from __future__ import annotations

import functools
import numbers
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import mlflow.pyfunc

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

    from pipeline.config import Params

CHECKPOINT = "checkpoint"
MODEL_NAME_IN_RUN = "translator"
MODEL_CODE = Path(__file__).with_name("translator_model.py")
MAX_BEAM = 16
# Generous enough for any request the limits accept; it stops a megabyte line before tokenising.
CHARS_PER_TOKEN = 16
EXAMPLE = ["Let's go.", "In the beginning God created the heavens and the earth."]


class RequestError(ValueError):
    """A request the limits refuse. The message is one line, meant for the person who sent it."""


@dataclass(frozen=True)
class Limits:
    max_sentences: int
    max_sentence_tokens: int


def model_config(params: Params) -> dict[str, Any]:
    """What the logged model reads at load time: search settings and limits (plain JSON)."""
    search, serve = params.evaluate, params.serve
    return {"beam_size": search.beam_size, "length_penalty": search.length_penalty,
            "max_len_ratio": search.max_len_ratio, "max_sentences": serve.max_sentences,
            "max_sentence_tokens": serve.max_sentence_tokens, "decode_batch": serve.decode_batch,
            "unk_dictionary": search.unk_dictionary,
            "shortlist": search.shortlist, "precision": search.precision, "unk_penalty": search.unk_penalty}


def check_beam_size(value: Any) -> int:
    # bool is an int to Python, and a JSON 2.5 must not silently become 2.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_BEAM:
        raise RequestError(f"beam_size must be an integer from 1 to {MAX_BEAM}, got {value!r}")
    return int(value)


def check_texts(inputs: list) -> list[str]:
    for i, text in enumerate(inputs, start=1):  # counted from 1, as people count lines
        if not isinstance(text, str):
            raise RequestError(f"input {i} is {_kind_of(text)}, not a string: send one text per item")
    return inputs


def _kind_of(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__} ({str(value)[:20]})"


@functools.cache
def _segmenter(lang: str):
    import pysbd
    from pysbd.languages import LANGUAGE_CODES

    from pipeline.text import base_language

    base = base_language(lang)
    # pysbd knows 23 languages; elsewhere English's rules still split at ". ", "? " and "! ".
    return pysbd.Segmenter(language=base if base in LANGUAGE_CODES else "en", clean=False)


def split_sentences(text: str, lang: str = "en") -> list[str]:
    """Sentences of a paragraph in `lang` (the source language), by pysbd's rules for it
    (abbreviations, numbers, quotes)."""
    return [s.strip() for s in _segmenter(lang).segment(text) if s.strip()]


def plan_lines(texts: list[str], tokenize, limits: Limits, paragraphs: bool = False,
               length=len, lang: str = "en") -> list[list[list[str]]]:
    """For each text, the cased token lists of the sentences to decode ([] for a blank line).
    `paragraphs` splits every text into sentences; otherwise only a text over the token limit
    is split. A sentence still over the limit is a RequestError naming it. `length` counts a
    token list as the model will see it (its subword pieces, with subwords)."""
    return [_sentences(text, i, tokenize, limits, paragraphs, length, lang) for i, text in enumerate(texts)]


def plan_request(texts: list[str], tokenize, limits: Limits, paragraphs: bool = False,
                 length=len, lang: str = "en") -> list[list[list[str]]]:
    """plan_lines for one request, which also holds at most `max_sentences` sentences."""
    _check_size(texts, limits)
    plan = plan_lines(texts, tokenize, limits, paragraphs, length, lang)
    total = sum(max(len(sentences), 1) for sentences in plan)
    if total > limits.max_sentences:
        raise RequestError(f"{total} sentences in one request (after sentence splitting); the limit is "
                           f"{limits.max_sentences} (serve.max_sentences): send fewer per request")
    return plan


def _check_size(texts: list[str], limits: Limits) -> None:
    """Refuse what cannot fit before the costly steps (sentence splitting, tokenising)."""
    if len(texts) > limits.max_sentences:
        raise RequestError(f"{len(texts)} texts in one request; the limit is {limits.max_sentences} "
                           "sentences (serve.max_sentences): send fewer per request")
    chars = sum(map(len, texts))
    budget = limits.max_sentences * limits.max_sentence_tokens * CHARS_PER_TOKEN
    if chars > budget:
        raise RequestError(f"{chars} characters in one request; at most {limits.max_sentences} sentences of "
                           f"{limits.max_sentence_tokens} tokens fit (about {budget} characters)")


def _sentences(text: str, index: int, tokenize, limits: Limits, paragraphs: bool, length,
               lang: str) -> list[list[str]]:
    if not text.strip():
        return []
    whole = tokenize(text)
    split = paragraphs or length(whole) > limits.max_sentence_tokens
    sentences = [tokenize(s) for s in split_sentences(text, lang)] if split else [whole]
    for tokens in sentences:
        if length(tokens) > limits.max_sentence_tokens:
            raise RequestError(f"a sentence of input {index + 1} has {length(tokens)} tokens; the limit is "
                               f"{limits.max_sentence_tokens} (serve.max_sentence_tokens): split it into shorter sentences")
    return sentences


def _rejoin(plan: list[list[list[str]]], translations: list[str]) -> list[str]:
    """One output per input text: its sentences' translations joined by a space."""
    sentences = iter(translations)
    return [" ".join(next(sentences) for _ in line) for line in plan]


class TranslatorModel(mlflow.pyfunc.PythonModel):
    """Built by `translator_model.py` at load time, configured from the model's `model_config`."""

    def load_context(self, context) -> None:
        self.configure(context.artifacts[CHECKPOINT], context.model_config)

    def configure(self, checkpoint: str | Path, config: dict[str, Any]) -> "TranslatorModel":
        from pipeline.device import pick_device
        from pipeline.model import load_translator

        self.default_beam = check_beam_size(config["beam_size"])
        # Models logged before these switches existed lack them: off and fp32, as they were decoded.
        self.search = {"alpha": config["length_penalty"], "max_len_ratio": config["max_len_ratio"],
                       "unk_dictionary": config.get("unk_dictionary", False),
                       "shortlist": config.get("shortlist", False),
                       "precision": config.get("precision", "float32"),
                       "unk_penalty": config.get("unk_penalty", 0.0)}
        self.limits = Limits(config["max_sentences"], config["max_sentence_tokens"])
        self.batch_size = config.get("decode_batch", config["max_sentences"])  # older models: one batch
        self.translator = load_translator(checkpoint, pick_device("auto"))
        return self

    # The type hints make the logged signature (list of strings in and out) and have MLflow pass
    # the REST request's list as it came: a string schema would turn null and 42 into "None" and "42".
    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from mlflow.exceptions import MlflowException

        try:
            return self.translate(model_input, **(params or {}))
        except RequestError as e:  # the REST server answers 400 with this line, no stack trace
            raise MlflowException.invalid_parameter_value(str(e)) from None

    def _plan(self, planner, texts: list, paragraphs: bool) -> list[list[list[str]]]:
        """plan_request or plan_lines with this model's tokeniser, limits and source language."""
        return planner(check_texts(texts), self._tokenize, self.limits, paragraphs, self._length,
                       self.translator.src_tok.lang)

    def translate(self, texts: list, beam_size: int | None = None, paragraphs: bool = False) -> list[str]:
        """One request: every limit applies."""
        beam = self._beam(beam_size)
        plan = self._plan(plan_request, texts, paragraphs)
        return _rejoin(plan, [t for t, _, _ in self._decode([s for line in plan for s in line], beam)])

    def translate_document(self, lines: list[str], beam_size: int | None = None, paragraphs: bool = False,
                           progress: bool = False) -> list[str]:
        """Any number of lines, decoded in requests of at most `max_sentences` sentences; the
        sentence length limit still applies."""
        from tqdm import tqdm

        beam = self._beam(beam_size)
        plan = self._plan(plan_lines, lines, paragraphs)
        sentences = [s for line in plan for s in line]
        step, translations = self.limits.max_sentences, []
        with tqdm(total=len(sentences), unit="sentence", disable=not progress) as bar:
            for start in range(0, len(sentences), step):
                translations += [t for t, _, _ in self._decode(sentences[start : start + step], beam)]
                bar.update(min(step, len(sentences) - start))
        return _rejoin(plan, translations)

    def translate_with_attention(self, text: str, beam_size: int | None = None, paragraphs: bool = False):
        """(source tokens, output words, attention matrix, translation) of a text decoded as one unit."""
        beam = self._beam(beam_size)
        [sentences] = self._plan(plan_request, [text], paragraphs)
        if len(sentences) != 1:
            raise RequestError(f"the attention heatmap needs exactly one sentence; this text has {len(sentences)}")
        [(translation, words, attention)] = self._decode(sentences, beam)
        # the attention's columns: the model's source tokens (pieces, with subwords), case kept
        return self.translator.src_tok.from_cased(sentences[0])[1], words, attention, translation

    def _beam(self, beam_size: int | None) -> int:
        return self.default_beam if beam_size is None else check_beam_size(beam_size)

    def _tokenize(self, text: str) -> list[str]:
        return self.translator.src_tok.words(text)  # Moses words, cased: what _decode takes

    def _length(self, words: list[str]) -> int:
        """What the limits count: the model's tokens (with subwords, pieces: a 2,000-letter word
        is one word but some 1,700 pieces of encoder and attention work)."""
        return len(self.translator.src_tok.from_cased(words)[0])

    def _decode(self, originals: list[list[str]], beam: int) -> list[tuple[str, list[str], Any]]:
        """(translation, output words, attention) per sentence of cased source tokens."""
        if not originals:
            return []
        tr = self.translator
        sources, originals = tr.src_tok.from_cased_all(originals)  # the model's tokens, and cased alike
        outputs = tr.translate_tokens(sources, beam_size=beam, batch_size=self.batch_size, originals=originals,
                                      **self.search)
        return [(tr.tgt_tok.detokenize(words), words, attention) for words, attention in outputs]


class ModelNotFound(LookupError):
    """`vamos translate --model` names nothing loadable; the message says what to do."""


def model_uri(spec: str, model_name: str) -> str:
    """An alias ("champion"), a version number ("3") or a URI ("models:/...", "runs:/...")."""
    if ":/" in spec:
        return spec
    return f"models:/{model_name}/{spec}" if spec.isdigit() else f"models:/{model_name}@{spec}"


def open_translator(spec: str, params: Params) -> TranslatorModel:
    """The translator that `spec` names: a model.pt file, or a model in the MLflow registry."""
    if spec.endswith(".pt"):
        from pipeline.model import NotAModel

        if not Path(spec).is_file():
            raise ModelNotFound(f"no such model file: {spec}")
        try:
            return load_model_file(spec, params)
        except NotAModel as e:  # a training checkpoint, say
            raise ModelNotFound(str(e)) from None
    return _load_registered(model_uri(spec, params.registry.model_name), params.registry.model_name)


def _load_registered(uri: str, model_name: str) -> TranslatorModel:
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import mlflow_setup

    mlflow = mlflow_setup()
    try:
        return mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except (MlflowException, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotFound(
            f"cannot load {uri} from {mlflow.get_tracking_uri()} ({reason}). Train and register a model with "
            f"`dvc repro` (or `vamos register`), promote a version with `python -c \"from mlflow import MlflowClient; "
            f"MlflowClient().set_registered_model_alias('{model_name}', 'champion', VERSION)\"` or the MLflow UI, "
            "or pass --model models/seq2seq/model.pt") from None


def load_model_file(model_file: str | Path, params: Params) -> TranslatorModel:
    """The same translator as the logged model, straight from a model.pt file."""
    return TranslatorModel().configure(model_file, model_config(params))


@contextmanager
def running_server(model_uri: str, cwd: str | Path | None = None, workers: int = 1,
                   start_timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow models serve` on 127.0.0.1 (a free port, the current environment), for tests and
    benchmarks: yields (base URL, process) once /ping answers; always stops the whole process group."""
    import requests

    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
               "local", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the server
    server = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own group: mlflow runs uvicorn as a child
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while not _answers(requests, f"{url}/ping"):
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"mlflow models serve exited with {server.returncode}: {log.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow models serve did not answer within {start_timeout} s")
            time.sleep(0.5)
        yield url, server
    finally:
        _stop(server)
        log.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for the servers the pipeline and tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(requests, url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the group, give it time to shut down, then SIGKILL whatever of it is left."""
    _signal_group(server, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(server, signal.SIGKILL)  # uvicorn may outlive the mlflow command that started it
    server.wait(timeout=5)


def _signal_group(server: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(server.pid, sig)
    except ProcessLookupError:  # the whole group is already gone
        pass


def log_translator(model_file: Path, params: Params) -> ModelInfo:
    """Log the translator into the active MLflow run as `translator` and return its ModelInfo."""
    import pipeline

    return mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=MODEL_CODE,
        model_config=model_config(params),
        artifacts={CHECKPOINT: str(model_file)},
        code_paths=[str(Path(pipeline.__file__).parent)],
        # With predict's type hints, this gives the signature: strings in and out, param beam_size.
        input_example=(EXAMPLE, {"beam_size": params.evaluate.beam_size}),
        pip_requirements=requirements(),
    )


def requirements() -> list[str]:
    """MLflow's own pins for a pyfunc (mlflow, cloudpickle), then lower bounds for the rest.

    Stated, not inferred: inference pins numpy and pandas exactly and lists this checkout's
    editable `vamos` distribution, which no index has (the `pipeline` code ships with the model)."""
    from importlib.metadata import version

    # Lower bounds, not pins: a serving machine with a GPU keeps its own torch build.
    packages = ("torch", "sacremoses", "sentencepiece", "pysbd", "numpy", "pandas", "pyyaml", "pydantic")
    return [f"mlflow=={mlflow.__version__}", *mlflow.pyfunc.get_default_pip_requirements(),
            *(f"{pkg}>={version(pkg).split('+')[0]}" for pkg in packages)]
