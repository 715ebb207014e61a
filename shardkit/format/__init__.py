"""The on-disk contract, defined once: index.json (`manifest`), tar shards (`tar`, and their
member walk `tar_members`), Parquet shards (`parquet`), and the file helpers every stage
shares (`files`: atomic publication, hashing, the one check of a shard file against its
record, the read-only mapping). Nothing here imports the converter or the reader; both
import this."""
