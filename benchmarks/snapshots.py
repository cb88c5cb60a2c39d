"""Each weight snapshot a training kept, as a model file of its own: with `train.average_checkpoints: N`
a run keeps its last N validated weights (weights-<step>.pt beside best.pt in .vamos/checkpoints/<run>/),
and this writes each one with best.pt's config, vocabularies and tokenisers. Then `vamos ensemble`
packs them into a checkpoint ensemble (k epochs of one training decoded together) and
benchmarks/score.py compares it with the best epoch, on the same sentences:

    python benchmarks/snapshots.py .vamos/checkpoints/<run> -o snapshots
    vamos ensemble snapshots/weights-*.pt -o last5.pt
    python benchmarks/score.py .vamos/checkpoints/<run>/best.pt last5.pt
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.model import load_model, save_model  # noqa: E402


def snapshot_models(run_dir: Path, out_dir: Path) -> list[Path]:
    """out_dir/weights-<step>.pt for each snapshot in run_dir, oldest first."""
    snapshots = sorted(run_dir.glob("weights-*.pt"))
    if not snapshots:
        raise FileNotFoundError(f"{run_dir} holds no weights-*.pt snapshot: train with train.average_checkpoints: N")
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError(f"{out_dir}: write the model files beside the run, not over its snapshots")
    model, src_vocab, tgt_vocab, src_tok, tgt_tok, lexicon = load_model(run_dir / "best.pt")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for snapshot in snapshots:
        model.load_state_dict(torch.load(snapshot, map_location="cpu", weights_only=True))
        written.append(out_dir / snapshot.name)
        save_model(written[-1], model, src_vocab, tgt_vocab, src_tok, tgt_tok, lexicon=lexicon)
    return written


def main(run_dir: Path, output: Path = typer.Option(..., "--output", "-o", help="folder for the model files")) -> None:
    try:
        written = snapshot_models(run_dir, output)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"snapshots.py: {e}", err=True)
        raise typer.Exit(2)
    typer.echo("\n".join(map(str, written)))


if __name__ == "__main__":
    typer.run(main)
