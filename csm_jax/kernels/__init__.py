"""Native CPU kernels called through `jax.ffi` (built on first use; see `int8_gemv`)."""
