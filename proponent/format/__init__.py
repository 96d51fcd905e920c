"""Formats: the index on disk (manifest, Zarr store, FAISS files, local/S3 I/O, integrity) and image decoding.

The bottom layer: imports nothing else of proponent.
"""
