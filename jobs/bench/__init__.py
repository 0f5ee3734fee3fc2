"""The sections of ``jobs/benchmark.py``, one module each (floor, passes, method, e2e, scaling,
stats, shards), and what they share: the model under test (``models``), the table's rows
(``table``), the local Ray, moto and child drivers (``cluster``), benchmark images as files
(``image_files``) and the /proc meters (``process_meters``).

Run it through the entry point, from the repository root: ``python jobs/benchmark.py --only …``.
"""
