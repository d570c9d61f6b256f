"""Evaluation: RULER-style synthetic tasks (``tasks``), the measuring harness (``harness``) and
its table / JSON / PNG output (``report``); ``jaxkv eval`` on the command line."""
