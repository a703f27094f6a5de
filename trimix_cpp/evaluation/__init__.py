"""Evaluation: task files into prompted items (:mod:`.tasks` and the modules it names) and generations
into scores (:mod:`.metrics`).

The metric libraries (sacrebleu, rouge-score) are optional and imported on first use, so reading task
files works without them.
"""
