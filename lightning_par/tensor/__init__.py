"""Tensor parallelism: 1D (Megatron) layers, vocabulary-parallel loss, plans that shard standard modules."""

from lightning_par.tensor.auto_plan import AutoPlan, auto_plan
from lightning_par.tensor.layers_1d import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    TensorGroup,
    VocabParallelEmbedding,
    VocabParallelOutput,
    shard_spec,
)
from lightning_par.tensor.loss import VocabParallelLogits, vocab_parallel_cross_entropy
from lightning_par.tensor.mha import ParallelMultiheadAttention
from lightning_par.tensor.plan import (
    AppliedPlan,
    applied_plan,
    parallelize,
    sharded_parameter_bytes,
    unparallelize,
)
from lightning_par.tensor.styles import (
    ColwiseParallel,
    ParallelAttention,
    ParallelBlock,
    ParallelStyle,
    Replicate,
    RowwiseParallel,
    SequenceParallelRegion,
    VocabParallel,
)

__all__ = [
    "AppliedPlan",
    "AutoPlan",
    "ColumnParallelLinear",
    "ColwiseParallel",
    "ParallelAttention",
    "ParallelBlock",
    "ParallelMultiheadAttention",
    "ParallelStyle",
    "Replicate",
    "RowParallelLinear",
    "RowwiseParallel",
    "SequenceParallelRegion",
    "ShardSpec",
    "TensorGroup",
    "VocabParallel",
    "VocabParallelEmbedding",
    "VocabParallelLogits",
    "VocabParallelOutput",
    "applied_plan",
    "auto_plan",
    "parallelize",
    "shard_spec",
    "sharded_parameter_bytes",
    "unparallelize",
    "vocab_parallel_cross_entropy",
]
