"""MosaicKV: dynamic two-dimensional KV-cache compression for long-context serving."""

__version__ = "0.1.0"
