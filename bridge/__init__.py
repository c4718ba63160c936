"""Tencent Cloud VOD events into Apache Kafka."""

__version__ = "0.1.0"
