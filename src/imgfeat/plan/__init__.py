"""The plan cuts the item stream into fixed, recorded shards (`shards`), finds duplicate keys
(`key_index`), streams shards to an engine as they are planned (`shard_stream`), and gives
each node of several its part (`nodes`)."""
