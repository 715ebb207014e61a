"""Tools over converted datasets: `verify`, `inspect` (info, preview), `bench`, `monitor`,
and `synth` (photo-like test images). They use the converter and the reader; only the CLI
and the public API import them."""
