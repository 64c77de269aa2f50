"""Images -> rows: discover, decode and rescale, batch, describe densely (pool, flip, scales,
L2), and the run that writes them through featx.store, locally or on Ray.
"""
