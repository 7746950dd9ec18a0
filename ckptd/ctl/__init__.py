"""``ckptctl``: the operator's command line. It reads a running daemon, a disk root or a bucket
directly; it is not imported by the training-side client."""
