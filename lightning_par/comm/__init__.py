"""Communication core: autograd-aware collectives with explicit groups, and pipeline point-to-point transfers."""

from .collectives import (
    all_gather_along_dim,
    broadcast_from,
    copy_to_group,
    gather_along_dim,
    group_rank,
    group_size,
    reduce_from_group,
    reduce_scatter_along_dim,
    reduce_to,
    split_along_dim,
)
from .p2p import (
    META_SLOTS,
    RecvHandle,
    SendHandle,
    irecv_tensors,
    isend_tensors,
    recv_tensors,
    send_tensors,
)

__all__ = [
    "group_size",
    "group_rank",
    "copy_to_group",
    "reduce_from_group",
    "split_along_dim",
    "gather_along_dim",
    "reduce_scatter_along_dim",
    "all_gather_along_dim",
    "broadcast_from",
    "reduce_to",
    "send_tensors",
    "recv_tensors",
    "isend_tensors",
    "irecv_tensors",
    "SendHandle",
    "RecvHandle",
    "META_SLOTS",
]
