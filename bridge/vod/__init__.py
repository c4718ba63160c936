"""The VOD domain: the event model and its decoding, the EventType table, callback signing and the VOD API
client. It imports nothing from ``bridge.sources``, ``bridge.delivery`` or ``bridge.ops``."""
