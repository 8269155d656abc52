"""The sans-I/O core: the flight protocol, the call, the subscription and lease machines,
the record format and the scripts. Nothing here does network I/O or imports the Redis side
(dedupe.backend.lifecycle) or operations (dedupe.ops)."""
