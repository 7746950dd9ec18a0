"""The daemon's wiring and life cycle: where the parts are built and connected (wiring.py), the
start-up adoption of what survived, serving, and the ``ckptd`` command line."""
