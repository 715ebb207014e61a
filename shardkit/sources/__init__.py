"""Input sources: turn a folder (or, later, a CSV) into an ordered list of input records.

Sources never decode anything; they list what there is, in a deterministic order.
"""

from shardkit.sources.imagefolder import InputRecord, Listing, PlanFailure, list_image_folder

__all__ = ["InputRecord", "Listing", "PlanFailure", "list_image_folder"]
