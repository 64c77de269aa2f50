"""The paper's transfer experiments: datasets and downloads, protocol splits, linear heads
with C chosen on held-out training data, metrics, the pipelines as data, and the report.
"""
