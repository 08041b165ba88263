"""Data: WebDataset shard pipeline, per-sample transforms, tokenizer.

Submodules are imported explicitly (``from siglip2.data.shards import ...``) so that
importing the package stays cheap and free of webdataset/transformers until needed.
"""
