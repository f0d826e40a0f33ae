"""Pack image-restoration data sets into WebDataset tar shards and stream them into training.

pack.py (restormer-pack) writes shards plus an index per split (index.py: each sample's byte range,
key and digest; `python -m data_shards.index` adds them to old indexes), verify.py (restormer-verify)
checks them, remote/ opens shard bytes by URL, stream.py builds the train/val loaders
(docs/streaming.md), atomic.py writes files whole or not at all, demo.py provides the built-in `demo`
data set.
"""
