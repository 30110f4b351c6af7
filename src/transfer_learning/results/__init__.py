"""Results: evaluation, prediction, export and the report of a trained checkpoint."""
