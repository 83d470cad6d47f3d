"""`monosemantic bench`: simulated real-time streams against the engine (and NeMo, as a baseline)."""
