"""Evaluation: data, prompts, backends, scoring, statistics and the results store."""
