"""The client's save path: one save after BeginSave (``shard_save``), layouts and slot views kept per
state shape (``save_plan``), the slots' mappings kept across saves (``slot_maps``) and made ahead of
need (``slot_warmer``), overlapped saves and their optimizer guard (``overlap``), and slots
page-locked for CUDA states (``pinned``)."""
