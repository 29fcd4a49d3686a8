"""A byte-level tokenizer for the streaming tests, in a module of its own: spawned stream workers unpickle it
by reference, and importing this module (unlike a test module) costs them nothing."""

from __future__ import annotations

import hashlib


class ByteTok:
    """UTF-8 bytes as ids 0..255, end-of-text 256: the token stream is the text itself (easy to inspect)."""

    vocab_size, eot_id = 257, 256
    fingerprint = hashlib.sha256(b"byte-tok").hexdigest()[:16]

    def encode_batch(self, texts, allowed_special="none"):
        return [list(t.encode()) for t in texts]
