"""The two drivers that carry the flight protocol to Redis: threads (sync) and asyncio (aio)."""
