"""Typed, validated params.yaml: every knob of every stage, checked before any work starts."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")
METRICS = ("bleu", "chrf", "ter")  # what evaluate and register score, all with sacrebleu
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # source names and sword variants


class InputError(ValueError):
    """Bad params or bad input: the message names the key, the file or the line. `vamos <stage>`
    exits 2 with it, and the flow does not retry (the same input fails alike)."""


class ParamsError(InputError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SwordSource(Strict):
    kind: Literal["sword"] = "sword"
    name: str = "bible"
    library: str = "/usr/share/sword"  # a SWORD library folder (Debian installs here) or a module zip
    src_module: str = "engWEB2015eb"
    tgt_module: str = "spaRV1909eb"
    books: list[str] | None = None  # OSIS book names to keep, e.g. [Ruth]; None keeps all
    # A second version of the same verses (e.g. src_module: engKJV2006eb, variant: kjv): its ids get
    # "@kjv" ("Gen.1.1@kjv"), so ingest keeps both versions, while prepare's split hashes the verse
    # alone, so every version of a verse lands in one split. None: ids as they are ("Gen.1.1").
    variant: str | None = None


class TsvSource(Strict):
    """Tab-separated pairs: source<TAB>target[<TAB>anything], as in Tatoeba/Anki exports."""

    kind: Literal["tsv"] = "tsv"
    name: str = "tsv"
    path: str


class TableSource(Strict):
    """CSV, TSV or Parquet with named columns (by file extension), read through pandas."""

    kind: Literal["table"] = "table"
    name: str = "table"
    path: str
    src_column: str = "english"
    tgt_column: str = "spanish"
    id_column: str | None = None  # a stable id per pair, if the table has one


class TextPairSource(Strict):
    """Two aligned plain-text files: line n of one translates line n of the other."""

    kind: Literal["text_pair"] = "text_pair"
    name: str = "text"
    src_path: str
    tgt_path: str


class FolderSource(Strict):
    """Every *.tsv file in a folder: drop files there and the next run trains on them."""

    kind: Literal["folder"] = "folder"
    name: str = "incoming"
    path: str = "data/incoming"


class GettextSource(Strict):
    """The translated messages of gettext catalogs (`.mo` or `.po`): one file, or every catalog in a
    folder such as /usr/share/locale/es/LC_MESSAGES. The message (msgid) is the source side, its
    translation (msgstr) the target."""

    kind: Literal["gettext"] = "gettext"
    name: str = "gettext"
    path: str
    catalogs: list[str] | None = None  # a folder's catalogs to read, by name (apt for apt.mo); None: all
    # The Debian packages that carry these catalogs: scripts/setup.sh installs them, and ingest stops
    # at a catalog that dpkg says came from another (so a fresh clone reads the same messages).
    packages: list[str] | None = None


Source = Annotated[Union[SwordSource, TsvSource, TableSource, TextPairSource, FolderSource, GettextSource],
                   Field(discriminator="kind")]


class IngestParams(Strict):
    sources: list[Source] = Field(default_factory=lambda: [SwordSource()], min_length=1)
    max_words: int = Field(80, ge=1)  # pairs with a longer side are dropped (counted)
    max_length_ratio: float = Field(3.0, ge=1.0)  # word-count ratio beyond which a pair is dropped
    shard_pairs: int = Field(25_000, ge=1)  # pairs read, cleaned and written as one shard at a time

    @model_validator(mode="after")
    def names_are_unique(self) -> "IngestParams":
        """A source's name prefixes its pairs' ids and keys its counts in the report: two sources of
        one name would overwrite each other's counts and drop each other's pairs as duplicates."""
        names = [source.name for source in self.sources]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"sources share the name {', '.join(map(repr, repeated))} (given, or their kind's "
                             "default): give each source a `name:` of its own")
        return self

    @model_validator(mode="after")
    def names_and_variants_are_plain(self) -> "IngestParams":
        """A name becomes part of MLflow metric keys (test_<name>_bleu) and a variant part of pair ids
        (Gen.1.1@kjv): letters, digits, _ . - only."""
        for source in self.sources:
            if not SAFE_NAME.fullmatch(source.name):
                raise ValueError(f"source name {source.name!r} must match {SAFE_NAME.pattern} (it keys MLflow "
                                 "metrics such as test_<name>_bleu)")
            variant = getattr(source, "variant", None)
            if variant is not None and not SAFE_NAME.fullmatch(variant):
                raise ValueError(f"source {source.name!r}: variant {variant!r} must match {SAFE_NAME.pattern}")
        return self

    @model_validator(mode="after")
    def sword_variants_are_unique(self) -> "IngestParams":
        """Two sword sources of one variant (or both without one) and common books give the same verse
        ids: ingest would drop the second's verses as duplicates. A second version needs a `variant:`."""
        swords = [source for source in self.sources if isinstance(source, SwordSource)]
        for i, first in enumerate(swords):
            for second in swords[i + 1:]:
                if first.variant == second.variant and books_overlap(first.books, second.books):
                    raise ValueError(f"sword sources {first.name!r}, {second.name!r} share the variant "
                                     f"{first.variant!r} and books, so their verse ids would collide: give each "
                                     "version a `variant:` of its own (e.g. variant: kjv)")
        return self

    def sword_variants(self) -> dict[str, str]:
        """{source name: variant} of the sword sources with a variant (prepare's split key)."""
        return {s.name: s.variant for s in self.sources if isinstance(s, SwordSource) and s.variant is not None}


def books_overlap(first: list[str] | None, second: list[str] | None) -> bool:
    """Whether two sword sources' `books` share one (None: every book)."""
    if first is None or second is None:
        return True
    return bool({b.lower() for b in first} & {b.lower() for b in second})


class SplitParams(Strict):
    """A pair is a test candidate if the hash of its id, as a fraction u in [0, 1), is below `test`,
    a valid candidate if below `test + valid`. Where a split has more candidates than its cap, the
    cap with the smallest u stay and the rest train: as the corpus grows the threshold only
    tightens, so no training pair ever becomes held out, and decoding them costs a bounded time."""

    valid: float = Field(0.01, gt=0, lt=0.5)
    test: float = Field(0.01, gt=0, lt=0.5)
    max_valid: int = Field(1500, ge=1, le=1_000_000)
    max_test: int = Field(1500, ge=1, le=1_000_000)
    # Sources held out whole, by name: every pair of one goes to its split, uncapped (e.g. whole
    # gettext catalogs as a test set of another kind of text); evaluate scores each source apart.
    hold_out: dict[str, Literal["valid", "test"]] = Field(default_factory=dict)


class VocabParams(Strict):
    min_freq: int = Field(2, ge=1)
    max_size: int = Field(30000, ge=10)


class SubwordParams(Strict):
    """Sentencepiece subwords on top of the Moses words, one model per language trained on the
    training split; "none" keeps whole words as the model's tokens."""

    model: Literal["none", "unigram", "bpe"] = "none"
    # Pieces per language (a soft limit: a small corpus may give fewer). At least the characters
    # of the training text, which sentencepiece keeps whole (character_coverage 1.0).
    vocab_size: int = Field(8000, ge=100, le=1_000_000)
    # Sentencepiece trains on at most this many training sentences, evenly spaced through the split.
    sample_sentences: int = Field(1_000_000, ge=1000)
    # Sentencepiece's threads. Its model's bytes depend on the count (measured: 1, 2 and 4 threads
    # give three models), so the default keeps one: the same model on every machine.
    threads: int = Field(1, ge=1, le=256)


class PrepareParams(Strict):
    src_lang: str = "en"  # Moses tokenisation rules; English also gets word2vec analogy scores
    tgt_lang: str = "es"
    lowercase_src: bool = True
    lowercase_tgt: bool = False  # the output keeps its case, so BLEU is scored on cased text
    split: SplitParams = SplitParams()
    vocab: VocabParams = VocabParams()
    subwords: SubwordParams = SubwordParams()


class EmbedParams(Strict):
    sg: Literal[0, 1] = 1
    vector_size: int = Field(256, ge=2)
    window: int = Field(5, ge=1)
    negative: int = Field(10, ge=1)
    sample: float = Field(1e-4, ge=0)
    min_count: int = Field(2, ge=1)
    epochs: int = Field(10, ge=1)
    workers: int = Field(1, ge=1)  # more is faster but not reproducible
    max_tokens: int | None = Field(5_000_000, ge=1)  # None: the whole train split; else an evenly spread sample
    max_vocab: int | None = Field(None, ge=1)  # gensim's max_final_vocab: None keeps every word of min_count


class TrainParams(Strict):
    hidden_size: int = Field(256, ge=2)
    encoder_layers: int = Field(1, ge=1)
    decoder_layers: int = Field(1, ge=1)
    bidirectional: bool = True
    attention: Literal["dot", "general", "bahdanau"] = "general"
    dropout: float = Field(0.2, ge=0, lt=1)
    # Word dropout (Sennrich & Zhang, 2019): source and target input words replaced by <unk> with
    # this probability in training; the targets to predict stay whole.
    word_dropout: float = Field(0.0, ge=0, lt=1)
    freeze_embeddings: bool = False
    # None keeps word2vec's own scale (best on the Bible); a number rescales the vectors to that
    # std, which helps on tiny corpora whose vectors are barely trained.
    embedding_std: float | None = Field(None, gt=0)
    tie_embeddings: bool = True
    teacher_forcing: float = Field(1.0, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    sampled_softmax: int = Field(3000, ge=0)  # log-uniform negatives per batch, log-Q corrected; 0 = full softmax
    input_feeding: bool = False  # feed the attentional state back (Luong); off runs the decoder LSTM in one call
    # Train on reversed targets: a right-to-left model, to rerank a left-to-right model's n-best list
    # (`vamos ensemble L2R.pt R2L.pt`); alone it translates as any model.
    right_to_left: bool = False
    batch_tokens: int = Field(2500, ge=16)  # target tokens per batch
    lr: float = Field(3e-3, gt=0)
    lr_schedule: Literal["plateau", "cosine", "linear"] = "plateau"  # cosine/linear decay to the last step
    warmup_steps: int = Field(0, ge=0)  # linear warm-up from 0 to lr
    lr_decay: float = Field(0.5, gt=0, lt=1)  # plateau: factor when valid loss stops falling
    clip_grad: float = Field(1.0, gt=0)
    average_checkpoints: int = Field(0, ge=0)  # 0: the best validation; N: the mean of the last N validated weights
    epochs: int = Field(16, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop after this many updates (before `epochs` if smaller)
    patience: int = Field(2, ge=1)  # validations without a better smoothed BLEU before stopping
    smoothing: int = Field(3, ge=1)  # early stopping compares means of this many validation BLEUs
    # A safety net, off by default: a wall-clock limit makes the model depend on the machine's speed.
    max_minutes: float | None = Field(None, gt=0)
    checkpoint_every: int = Field(200, ge=1)  # steps
    # Also validate every this many updates (None: only at epoch ends), so that a long epoch is not
    # one blind stretch: such a validation may write best.pt, counts for early stopping and keeps a
    # snapshot for averaging, as an epoch's does; the plateau schedule still acts once an epoch.
    validate_every: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 mixed precision on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX)
    threads: int = Field(0, ge=0)  # torch CPU threads; 0 = all cores
    # Build the source->target translation dictionary from the final model's attention alignments
    # over the training split and store it in model.pt (pipeline.lexicon; for evaluate's switches).
    lexicon: bool = True
    # The lexicon reads at most this many training pairs: a fixed seeded sample of a larger split
    # (all of a smaller one, in the usual order), so its cost stays bounded.
    lexicon_pairs: int = Field(200000, ge=1)


class EvaluateParams(Strict):
    beam_size: int = Field(5, ge=1, le=16)  # the served model accepts 1-16
    length_penalty: float = Field(1.0, ge=0)
    max_len_ratio: float = Field(1.5, gt=0)
    batch_size: int = Field(64, ge=1)
    heatmaps: int = Field(4, ge=0)
    samples: int = Field(20, ge=0)
    unk_dictionary: bool = False  # an output <unk> becomes the lexicon's translation of its source word
    shortlist: bool = False  # score only the lexicon's likely target words (faster decoding)
    # Decoding in bf16 autocast, as train.amp trains: the matrix products in bf16 (2x fp32's speed on
    # a CPU with AVX512-BF16), attention weights and scores fp32, and on a CPU the LSTM states too.
    precision: Literal["float32", "bfloat16"] = "bfloat16"
    unk_penalty: float = Field(2.0, ge=0)  # taken off a hypothesis's score for each <unk> it emits


class RegisterParams(Strict):
    model_name: str = "vamos-en-es"  # in params.yaml, null names it after the pair (Params below)
    experiment: str = "vamos"
    metric: str = "bleu"  # what promotion compares; must be a key of `directions`
    # Which way each metric improves; promotion flips the comparison for lower-is-better ones.
    directions: dict[str, Literal["higher", "lower"]] = Field(
        default_factory=lambda: {"bleu": "higher", "chrf": "higher", "ter": "lower"})
    # On a few hundred test sentences a difference under about one BLEU point can be noise, so
    # the champion moves only for a gain of at least `min_gain` that the paired bootstrap test
    # finds significant at `max_p`.
    min_gain: float = Field(1.0, ge=0)
    max_p: float = Field(0.05, gt=0, le=1)
    bootstrap_samples: int = Field(1000, ge=100)
    min_score: float = 10.0  # a first model that does not reach this gets no alias

    @model_validator(mode="after")
    def _metric_has_a_direction(self) -> "RegisterParams":
        unknown = set(self.directions) - set(METRICS)
        if unknown:
            raise ValueError(f"directions: unknown metric(s) {sorted(unknown)}; known: {list(METRICS)}")
        if self.metric not in self.directions:
            raise ValueError(f"metric {self.metric!r} is not one of {sorted(self.directions)}")
        return self


class ServeParams(Strict):
    """Limits on one request, enforced by the logged model (pyfunc, REST) and `vamos translate`.
    A line longer than max_sentence_tokens is split into sentences first; a sentence still longer
    is rejected with an error naming the limit (never silently cut or translated in pieces)."""

    max_sentences: int = Field(64, ge=1)  # sentences decoded per request, after splitting
    max_sentence_tokens: int = Field(128, ge=1)  # model tokens (words or subword pieces); training kept <= 80 words
    # A request's sentences are sorted by length and decoded this many at a time, so that short
    # ones do not step along with the longest of the request (docs/benchmarks.md: decoding speed).
    decode_batch: int = Field(32, ge=1)


class ParallelParams(Strict):
    """Where ingest's and prepare's sharded work runs (pipeline.parallel). No stage's output depends
    on it, so dvc.yaml lists it for none: a change reruns nothing."""

    workers: int = Field(0, ge=0)  # processes of the local Dask cluster; 0: one per core; 1: all in the stage's process
    scheduler: str | None = None  # a running Dask scheduler's address (tcp://host:8786); VAMOS_DASK_SCHEDULER wins


class FlowParams(Strict):
    """The Prefect flow's limits (flows/pipeline_flow.py). No DVC stage reads them, so a change reruns nothing."""

    stage_timeout_minutes: float = Field(60, gt=0)  # a stage still running then is killed and the run fails naming it
    # train's timeout when train.max_minutes is null; with a budget it is max_minutes * 1.5 + 30 (setup, the last
    # validation, the lexicon and saving come on top of the budget)
    train_timeout_minutes: float = Field(360, gt=0)
    stage_timeouts: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)  # per stage; wins
    # a stage that exits 75 (EX_TEMPFAIL: a lock or a busy database) is retried after each of these in turn
    retry_delays_seconds: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [30, 120, 480],
                                                                      max_length=10)

    def timeout_minutes(self, stage: str, train: "TrainParams") -> float:
        if stage in self.stage_timeouts:
            return self.stage_timeouts[stage]
        if stage == "train":
            return train.max_minutes * 1.5 + 30 if train.max_minutes else self.train_timeout_minutes
        return self.stage_timeout_minutes


class Params(Strict):
    seed: int = 1234
    ingest: IngestParams = IngestParams()
    prepare: PrepareParams = PrepareParams()
    embed: EmbedParams = EmbedParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    # "register" would shadow a pydantic method, so the field has another name.
    registry: RegisterParams = Field(RegisterParams(), alias="register")
    serve: ServeParams = ServeParams()
    parallel: ParallelParams = ParallelParams()
    flow: FlowParams = FlowParams()

    @model_validator(mode="before")
    @classmethod
    def _model_named_after_its_pair(cls, data):
        """register.model_name null or absent: vamos-<src>-<tgt> (vamos-es-en), so that each language
        pair has a registered model, and a champion, of its own in one MLflow store."""
        if not isinstance(data, dict):
            return data
        register, prepare = data.get("register") or {}, data.get("prepare") or {}
        if not isinstance(register, dict) or register.get("model_name") is not None:
            return data
        if isinstance(prepare, dict):
            defaults = PrepareParams.model_fields
            langs = [prepare.get(key, defaults[key].default) for key in ("src_lang", "tgt_lang")]
        elif isinstance(prepare, PrepareParams):
            langs = [prepare.src_lang, prepare.tgt_lang]
        else:
            return data  # not a section: validation names it
        return {**data, "register": {**register, "model_name": "vamos-{}-{}".format(*langs)}}

    @model_validator(mode="after")
    def _split_leaves_training_data(self) -> "Params":
        if self.prepare.split.valid + self.prepare.split.test >= 0.5:
            raise ValueError("prepare.split: valid + test must leave most pairs for training")
        return self

    @model_validator(mode="after")
    def _held_out_sources_exist(self) -> "Params":
        names = {source.name for source in self.ingest.sources}
        unknown = sorted(set(self.prepare.split.hold_out) - names)
        if unknown:
            raise ValueError(f"prepare.split.hold_out: no source named {', '.join(map(repr, unknown))} in "
                             f"ingest.sources (names: {', '.join(sorted(names))})")
        if names <= set(self.prepare.split.hold_out):
            raise ValueError("prepare.split.hold_out: every source is held out, so nothing would train")
        return self

    @model_validator(mode="after")
    def _catalogs_translate_from_english(self) -> "Params":
        """A gettext catalog's message (msgid) is English: its pairs cannot serve another source language."""
        catalogs = [s.name for s in self.ingest.sources if isinstance(s, GettextSource)]
        if catalogs and self.prepare.src_lang != "en":
            raise ValueError(f"ingest.sources {', '.join(map(repr, catalogs))}: a gettext catalog translates from "
                             f"English, but prepare.src_lang is {self.prepare.src_lang!r}; remove the gettext "
                             "sources for this pair (and their prepare.split.hold_out entries)")
        return self

    @model_validator(mode="after")
    def _lexicon_switches_need_a_lexicon(self) -> "Params":
        wanted = [f"evaluate.{key}" for key in ("unk_dictionary", "shortlist") if getattr(self.evaluate, key)]
        if wanted and not self.train.lexicon:
            raise ValueError(f"{' and '.join(wanted)} need(s) train.lexicon: true (the dictionary is built "
                             "at the end of training and stored in model.pt)")
        return self


def _describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml, or raise ParamsError naming the file and each bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run vamos from the project root)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of stage names to params")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(f"{path}: invalid params\n{_describe(e)}") from None


def _file_names_no_model(path: str | Path) -> bool:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    register = raw.get("register") if isinstance(raw, dict) else None
    return not isinstance(register, dict) or register.get("model_name") is None


def params_with(path: str | Path, overrides: Mapping[str, Any] | None) -> Params:
    """params.yaml with `{"section.key": value}` overrides applied, validated; ParamsError names a
    bad key, of the file or of the overrides. A key may be one that the file leaves at its default."""
    params = load_params(path)
    if not overrides:
        return params
    raw = params.model_dump(by_alias=True)
    if _file_names_no_model(path):  # named after the pair, which an override may change
        raw["register"]["model_name"] = None
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"override {key!r}: {'.'.join(parents)} is not a section of {path}")
            node = node[part]
        if leaf not in node:
            raise ParamsError(f"override {key!r}: no such param in {path}")
        node[leaf] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(f"overrides {dict(overrides)}: invalid params\n{_describe(e)}") from None


def dvc_set_args(overrides: Mapping[str, Any]) -> list[str]:
    """The overrides as `dvc exp run -S` values, which DVC writes into params.yaml (`++key=` sets a
    key, also one that the file or a dict lacks)."""
    return [f"++{key}={_hydra_value(value)}" for key, value in overrides.items()]


def _hydra_value(value: Any) -> str:
    """A param value in the override grammar of `dvc exp run -S` (Hydra's): JSON, but with dict keys
    unquoted, which Hydra would read as one string."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_hydra_value(item) for item in value) + "]"
    return json.dumps(value)
