"""Object stores behind one small protocol (package; see :mod:`storage.objectstore.s3`).

Every name of the former ``storage.objectstore`` module stays importable from here.
"""

from storage.objectstore.s3 import (
    FsspecObjectStore,
    ObjectStore,
    Progress,
    S3ObjectStore,
    Writable,
    open_object_store,
)

__all__ = [
    "FsspecObjectStore",
    "ObjectStore",
    "Progress",
    "S3ObjectStore",
    "Writable",
    "open_object_store",
]
