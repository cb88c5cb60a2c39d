"""The MLflow pyfunc translator: list of English strings in, list of Spanish strings out.

The model carries its checkpoint (weights, vocabularies, tokeniser settings) as an artifact
and the `pipeline` package as code, so neither word2vec files nor this checkout are needed
to load it."""
from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

CHECKPOINT = "checkpoint"


class TranslatorModel(mlflow.pyfunc.PythonModel):
    def __init__(self, beam_size: int = 5, length_penalty: float = 1.0, max_len_ratio: float = 1.5):
        self.search = {"beam_size": beam_size, "alpha": length_penalty, "max_len_ratio": max_len_ratio}

    def load_context(self, context) -> None:
        import torch

        from pipeline.model import load_translator

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.translator = load_translator(context.artifacts[CHECKPOINT], device)

    def predict(self, context, model_input, params=None):  # no type hints: the logged signature rules
        if isinstance(model_input, pd.DataFrame):  # the REST server sends a frame
            model_input = model_input.iloc[:, 0].tolist()
        elif isinstance(model_input, str):
            model_input = [model_input]
        texts = [str(t) for t in model_input]
        return self.translator.translate(texts, **{**self.search, **(params or {})}) if texts else []
