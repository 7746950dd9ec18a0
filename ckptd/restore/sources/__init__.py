"""Restore sources: where a rank's shard can be restored from, one module per place.

``base`` holds the ``RestoreSource`` protocol and what the sources share; ``memory``, ``disk``,
``peer`` and ``object`` implement it once each. The daemon's wiring (ckptd/daemon/wiring.py)
builds the sources it has, one line each, and hands the list to the ``Restorer``, which asks them
nearest first (``distance``): memory, disk, peers, object store.
"""
