"""The deployment around the core: the HTTP API, the Redis stream, the worker, checkpoints, metrics, settings, the
local stack.

`codec` and `model_store` are the wire format: the only part of it the adversary (attacker_sim) may import.
"""
