"""The pipeline: the stages of a batch on Ray, called one after the other by :mod:`.run`.

=================  ===================================================================
module             job
=================  ===================================================================
``run``            the conductor: ``run_manifest`` / ``plan_manifest``
``listing``        1 · sources → listing files (shards indexed by :mod:`cdi_ray.sources`)
``describe``       2 · models → fingerprint, geometry, conditioning
``hashing``        3 · unknown URIs → content hashes (the store's URI → hash index)
``plan``           4 · what each model computes, what each audit reads (Ray-free);
                   ``imagesets``: resolved sources and store keys; ``rows``: the stream row
``compute``        5 · the feature streams and the descriptor streams (``streams``, ``actors``)
``aggregate``      6 · the tests and controls per audit (``aggregator``: the actor; ``payload``)
``results``        7 · FDR, verdicts, results files, reports; ``nightly``: dated runs and diffs;
                   ``standing``: a standing audit's life-long look and its stored state
``cluster``        Ray start-up, tasks, the aggregator pool, the process's exit
``store``          the feature store; ``model_cache``: ``s3://`` models fetched once per node
=================  ===================================================================
"""
