"""Runtime adapters, one module per runtime; the registry is edgelm.session.RUNTIME_MODULES."""
