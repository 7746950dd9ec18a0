"""ckptd: asynchronous tiered checkpoint storage for large-model training.

This package is the node-local daemon. Importing ``ckptd`` itself is cheap and pulls in nothing
heavy: the training-side client (``ckptd_client``) imports the light modules ``ckptd.core.types``,
``ckptd.core.errors``, ``ckptd.core.layout`` and the generated stubs, never the tiers or the server.
"""

__version__ = "0.1.0"
