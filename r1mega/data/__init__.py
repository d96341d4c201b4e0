"""Datasets, templates, tokenizers and built-in tasks."""
