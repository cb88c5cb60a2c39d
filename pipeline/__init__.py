"""vamos: a reproducible English-to-Spanish translation pipeline (DVC stages, Prefect flows, MLflow registry)."""
