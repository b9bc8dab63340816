"""Build WebDataset shards (``{key}.png``, ``.txt``, ``.json``) and a manifest from raw sources."""
