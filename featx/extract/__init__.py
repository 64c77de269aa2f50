"""Images -> rows: discover, decode and rescale, batch, describe densely (pool, flip, scales,
L2); the run planned once (job) and written through featx.store, locally or on Ray.
"""
