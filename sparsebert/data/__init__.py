"""Data for the trainer: GLUE tasks and their metrics, raw-text corpora, collation, tokenization cache."""
