"""One worker's shard loop: the decode pool, CPU and GPU decoding, batching into the model,
batch sizing, the split of cores, and host-memory tuning."""
