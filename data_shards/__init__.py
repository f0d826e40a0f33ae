"""Pack image-restoration data sets into WebDataset tar shards and stream them into training.

pack.py (restormer-pack) writes shards plus an index per split, verify.py (restormer-verify) checks
them, stream.py builds the train/val loaders, demo.py provides the built-in `demo` data set.
"""
