"""The client's restore path: the streamed RPC (``stream``), the walk onto the live state (``walk``),
the chunk copier that checks a memory copy as it copies (``slot_copy``, over ``pcopy``'s pool), the
strict check before any copy (``strict``) and the slot mapped ahead of a restore (``premap``)."""
