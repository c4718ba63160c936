"""One delivery path for both sources: de-duplication, publish or spool, dead-letter, and the Kafka sink behind
a small protocol. It depends on :mod:`bridge.vod` only, never on :mod:`bridge.sources`."""
