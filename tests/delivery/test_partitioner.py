"""The fast murmur2 partitioner must agree with aiokafka's (and so with the Java client) on every key."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.delivery.partitioner import murmur2, partition_for


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_same_hash_as_aiokafka(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key) & 0xFFFFFFFF


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=80), st.integers(min_value=1, max_value=64))
def test_same_partition_as_aiokafka(key: bytes, partitions: int) -> None:
    all_partitions = list(range(partitions))
    assert partition_for(key, all_partitions, all_partitions) == DefaultPartitioner()(key, all_partitions, [])


def test_known_java_values() -> None:
    # Values from the Kafka Java client's UtilsTest.testMurmur2 (as signed 32-bit ints there).
    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536}
    for key, java in cases.items():
        assert murmur2(key) == java & 0xFFFFFFFF


def test_no_key_picks_an_available_partition() -> None:
    assert partition_for(None, [0, 1, 2], [2]) == 2
    assert partition_for(None, [0, 1, 2], []) in (0, 1, 2)
