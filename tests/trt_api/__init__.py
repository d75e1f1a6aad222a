"""TEST CODE, never installed: the TensorRT API-conformance check (see check.py). It proves API conformance only."""
