"""ckptd as a torch.distributed.checkpoint (DCP) storage backend (needs torch).

    import torch.distributed.checkpoint as dcp
    from ckptd_client.dcp import CkptdStorageReader, CkptdStorageWriter

    dcp.save(state, storage_writer=CkptdStorageWriter("my-job", step))
    dcp.async_save(state, storage_writer=CkptdStorageWriter("my-job", step))
    dcp.load(state, storage_reader=CkptdStorageReader("my-job"))   # newest step, any world size

docs/dcp.md has the whole story; ``codec.py`` the stored metadata record.
"""

from ckptd_client.dcp.codec import DcpMetadataCorrupt, DcpSchemaTooNew, ShardRef
from ckptd_client.dcp.reader import CkptdStorageReader
from ckptd_client.dcp.writer import CkptdStorageWriter

__all__ = ["CkptdStorageReader", "CkptdStorageWriter", "DcpMetadataCorrupt", "DcpSchemaTooNew", "ShardRef"]
