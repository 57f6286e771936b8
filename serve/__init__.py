"""Client and load test for a model served with `mlflow models serve` (see the README's Serving)."""
