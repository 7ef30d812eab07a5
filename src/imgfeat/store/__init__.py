"""The output folder: layout, manifest, shard writer, and the reader users open."""
