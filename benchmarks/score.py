"""Test (or validation) BLEU, chrF and greedy BLEU of model files, decoded exactly as `evaluate`
decodes: how a training's best checkpoint is compared with its averaged weights, or two runs'
models with each other, without touching reports/ or MLflow. With several models, each one after
the first is also compared with the first by the registry's paired bootstrap test, on the same
sentences (delta, 95% interval, p-value).

    python benchmarks/score.py models/seq2seq/model.pt .vamos/checkpoints/*/best.pt
    python benchmarks/score.py model.pt --split valid --set evaluate.beam_size=10
    python benchmarks/score.py model.pt --origin software-test --apertium eng-spa
    python benchmarks/score.py default.pt both.pt --by-origin   # also each source's rows, from one decoding

`--apertium eng-spa` (English to Spanish; spa-eng the other way) adds Debian's rule-based Apertium
(apt: apertium-eng-spa) as the first row, on the same source lines: the translator a user would
otherwise pick. The paired comparisons then set each model against Apertium."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

sys.path.insert(0, str(Path(__file__).parent))
from common import params_with  # noqa: E402

from pipeline.data import load_split  # noqa: E402
from pipeline.evaluate import detokenize_all, score, translate_split  # noqa: E402
from pipeline.model import load_translator  # noqa: E402
from pipeline.registry import paired_bootstrap  # noqa: E402
from pipeline.device import pick_device  # noqa: E402


def apertium(pair: str, sources: list[str]) -> list[str]:
    """Apertium's translation of each source line (-u: unknown words as they are, unmarked). The
    lines go as paragraphs, a blank line apart: across single line breaks Apertium reads on, and
    a line without a full stop ran into the next (of 200 lines sampled from the 2,999 of the test
    split, 109 came out otherwise than alone, some with words moved across the break; a blank
    line apart, 17, and none moved)."""
    done = subprocess.run(["apertium", "-u", pair], input="".join(s.replace("\n", " ") + "\n\n" for s in sources),
                          capture_output=True, text=True, check=True)
    lines = [line.strip("\n") for line in done.stdout.split("\n\n")][: len(sources)]
    if len(lines) != len(sources):
        raise RuntimeError(f"apertium {pair}: {len(lines)} lines out for {len(sources)} in")
    return [line.strip() for line in lines]


def main(models: list[Path], split: str = "test", data: Path = Path("data/prepared"),
         set: list[str] = typer.Option([], "--set"),
         origin: Optional[str] = typer.Option(None, help="only the split's pairs of this source (ingest.sources' name)"),
         by_origin: bool = typer.Option(False, help="also the table and paired tests of each source's pairs"),
         apertium_pair: Optional[str] = typer.Option(None, "--apertium", help="also score Apertium's PAIR (spa-eng, eng-spa)")) -> None:
    params = params_with(set)
    frame = load_split(split, data)
    if origin is not None:
        frame = frame[frame["origin"] == origin].reset_index(drop=True)
        if frame.empty:
            raise typer.BadParameter(f"the {split} split has no pair of the source {origin!r}", param_hint="--origin")
    references = frame["tgt"].tolist()
    print_header(split, params)
    outputs, greedy_outputs = [], []  # beam and greedy text of each model, in the order of `models`
    if apertium_pair:
        outputs.append(apertium(apertium_pair, frame["src"].tolist()))
        greedy_outputs.append(None)
        models = [Path(f"apertium {apertium_pair}"), *models]
        print_row(models[0], outputs[0], None, references, params)
    for path in models[len(outputs):]:
        translator = load_translator(path, pick_device(params.train.device))
        outputs.append(detokenize_all(translator, translate_split(translator, frame, params.evaluate)))
        greedy_outputs.append(detokenize_all(translator, translate_split(translator, frame, params.evaluate,
                                                                         beam_size=1)))
        print_row(path, outputs[-1], greedy_outputs[-1], references, params)
    if len(models) > 1:
        print_paired(models, outputs, references, params)
    if by_origin:
        for name, rows in sorted(frame.groupby("origin").indices.items()):
            print(f"\n### {name}\n")
            print_header(split, params)
            for path, beam, greedy in zip(models, outputs, greedy_outputs):
                print_row(path, subset(beam, rows), subset(greedy, rows), subset(references, rows), params)
            if len(models) > 1:
                print_paired(models, [subset(o, rows) for o in outputs], subset(references, rows), params)


def subset(texts: list[str] | None, rows) -> list[str] | None:
    return None if texts is None else [texts[i] for i in rows]


def print_header(split: str, params) -> None:
    print(f"| model | {split} sentences | BLEU (beam {params.evaluate.beam_size}) | chrF | greedy BLEU |")
    print("|---|---|---|---|---|")


def print_row(model: Path, beam: list[str], greedy: list[str] | None, references: list[str], params) -> None:
    """A model's scores; Apertium's row has no greedy column."""
    lang = params.prepare.tgt_lang
    scores = score(beam, references, lang)
    greedy_bleu = "" if greedy is None else f"{score(greedy, references, lang)['bleu']:.2f}"
    print(f"| {model} | {len(references)} | {scores['bleu']:.2f} | {scores['chrf']:.2f} | {greedy_bleu} |", flush=True)


def print_paired(models: list[Path], outputs: list[list[str]], references: list[str], params) -> None:
    """Each model's beam output against the first model's by the paired bootstrap test that
    `register` applies to its metric, here for every metric (same resamples for every model)."""
    cfg = params.registry
    print(f"\nAgainst {models[0]} (paired bootstrap, {cfg.bootstrap_samples} samples):\n")
    print("| model | metric | delta | 95% interval | p | better is |")
    print("|---|---|---|---|---|---|")
    for path, output in zip(models[1:], outputs[1:]):
        for metric, direction in cfg.directions.items():
            test = paired_bootstrap(metric, output, outputs[0], references, cfg.bootstrap_samples, params.seed,
                                    params.prepare.tgt_lang)
            low, high = test["delta_95ci"]
            print(f"| {path} | {metric} | {test['delta']:+.2f} | [{low:+.2f}, {high:+.2f}] | {test['p_value']:.3f} "
                  f"| {direction} |")


if __name__ == "__main__":
    typer.run(main)
