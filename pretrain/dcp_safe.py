"""Loading a DCP checkpoint without running code from it.

A checkpoint directory is a file from elsewhere (downloaded, shared, copied from a cluster).
torch's own `FileSystemReader` unpickles the `.metadata` file with plain `pickle.load`, and its
`DefaultLoadPlanner` reads the non-tensor items (the optimizer's param groups) with
`torch.load(weights_only=False)`: either runs whatever a crafted file asks for. Here the metadata
goes through an unpickler that resolves only the classes DCP's metadata is made of, and the
non-tensor items through `torch.load(weights_only=True)`. Tensors were already read with
`weights_only=True` by torch.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_METADATA, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's metadata names something other than DCP's own metadata classes."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self._path}: refusing to load {module}.{name} (a DCP checkpoint's metadata holds "
            "only DCP's metadata classes; this file may have been crafted)"
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # plain data only: numbers, strings, lists
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state: dict[str, Any], path: str | Path) -> None:
    """`dcp.load(state, checkpoint_id=path)`, in place, refusing code in the checkpoint."""
    reader = SafeFileSystemReader(str(path))
    reader.read_metadata()  # a crafted file fails here, with its own error (DCP would wrap it)
    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
