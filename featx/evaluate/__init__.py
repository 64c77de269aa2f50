"""The paper's transfer experiments: datasets and downloads, seeded splits, the one protocol
runner (held-out C, refit, scores; `featx probe` runs it too), linear heads, metrics, the
pipelines as data, the feature cache, and the report.
"""
