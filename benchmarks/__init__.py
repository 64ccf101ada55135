"""Side-by-side benchmarks: dsage against a local process pool, dask.distributed,
Ray and ipyparallel. Run ``python -m benchmarks --help``; see ``benchmarks/README.md``."""
