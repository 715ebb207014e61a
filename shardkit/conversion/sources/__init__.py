"""Input sources: turn a folder or a CSV into an ordered list of input records.

Sources never decode anything; they list what there is, in a deterministic order
(`imagefolder`: sorted paths; `image_csv`: CSV order). `csv` streams CSV files for both image
and tabular CSVs. Import the module you need: this package imports none of them, so a
conversion worker loads only what its tasks use.
"""
