"""Conversion: SRC → sources (inputs as records) → plan (shards fixed up front) → tasks on an
executor (decode, resize, encode, write parts and shards) → commit (publish, journal,
errors.jsonl, index.json last). `entry.convert` starts it and `run` drives it; see docs/architecture.md."""
