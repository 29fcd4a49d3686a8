"""Token data: ``prepare`` (text -> shards), ``TokenLoader`` (shards -> batches), ``pairs`` (seq2seq batches).

See docs/data.md for the shard format and the flow. Submodules are imported where used, so that
``import scratchlm.data`` stays cheap.
"""
