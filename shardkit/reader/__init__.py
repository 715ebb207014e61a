"""Reading converted datasets.

`open_dataset` (exported as ``shardkit.open``) gives numpy access with no torch needed.
"""

from shardkit.reader.numpy_dataset import Dataset, open_dataset

__all__ = ["Dataset", "open_dataset"]
