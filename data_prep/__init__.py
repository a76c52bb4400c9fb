"""hybridps data preparation: dataset release parsers, synthetic copies, and the
webdataset shard builder (``python -m hybridps.data_prep``)."""
