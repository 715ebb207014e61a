"""Input sources: turn a folder or a CSV into an ordered list of input records.

Sources never decode anything; they list what there is, in a deterministic order
(`imagefolder`: sorted paths; `image_csv`: CSV order). `csv` streams CSV files for both image
and tabular CSVs.
"""

from shardkit.conversion.sources.image_csv import list_image_csv
from shardkit.conversion.sources.imagefolder import InputRecord, Listing, list_image_folder

__all__ = ["InputRecord", "Listing", "list_image_csv", "list_image_folder"]
