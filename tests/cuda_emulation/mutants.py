"""Deliberately broken copies of real kernels: the mistakes the harness exists to catch.

Each mutant is one textual edit of a CUDA source (the original snippet must occur exactly once,
so a mutant that no longer applies fails loudly instead of testing nothing). The edit keeps the
line count, so faults point at the source's own lines. test_emu_mutants.py asserts that every
mutant is caught (a fault, or a result that differs from the CPU op) and that the unbroken
kernel passes the same check under the same schedules.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    source: str
    original: str
    broken: str
    why: str  # what a GPU would do with it

    @property
    def namespace(self) -> str:
        return f"sparsebert_emu_{self.name}"

    def apply(self, text: str) -> str:
        count = text.count(self.original)
        if count != 1:
            raise ValueError(f"mutant {self.name}: the original snippet occurs {count} times in {self.source}")
        assert self.original.count("\n") == self.broken.count("\n"), "a mutant keeps the line count"
        return text.replace(self.original, self.broken)


MUTANTS = [
    Mutant(
        name="topk_rows_no_barrier",
        source="csrc/topk.cu",
        original="""      if ((kc & prefix_mask) == prefix) atomicAdd(&hist[(kc >> shift) & 255u], 1u);
    }
    __syncthreads();
""",
        broken="""      if ((kc & prefix_mask) == prefix) atomicAdd(&hist[(kc >> shift) & 255u], 1u);
    }

""",
        why="thread 0 picks the bucket of the row's k-th key before the other threads have counted theirs",
    ),
    Mutant(
        name="optim_count_shuffle_from_8",
        source="csrc/masked_optim.cu",
        original="for (int offset = 16; offset > 0; offset >>= 1) local += __shfl_down_sync(",
        broken="for (int offset = 8; offset > 0; offset >>= 1) local += __shfl_down_sync(",
        why="the kept-count reduction of every warp drops lanes 16-31: compact state lengths come out wrong",
    ),
    Mutant(
        name="linear_simt_no_trailing_barrier",
        source="csrc/masked_linear.cu",
        original="""    // The next iteration overwrites the tiles that slower threads may still be reading.
    __syncthreads();
""",
        broken="""    // The next iteration overwrites the tiles that slower threads may still be reading.

""",
        why="a fast thread stages the next k-tile over the one slower threads still multiply",
    ),
    Mutant(
        name="topk_mask_early_return",
        source="csrc/topk.cu",
        original="""    if (g >= total_bytes) break;
    const ByteRef r = locate(g);
    uint32_t byte = 0;
""",
        broken="""    if (g >= total_bytes) return;
    const ByteRef r = locate(g);
    uint32_t byte = 0;
""",
        why="threads past the last mask byte leave before the block reduction's barrier, which then hangs",
    ),
    Mutant(
        name="sparse_linear_no_tile_barrier",
        source="csrc/sparse_linear.cu",
        original="""  __syncthreads();
  // Thread i writes row n0 + i % 32""",
        broken="""
  // Thread i writes row n0 + i % 32""",
        why="a thread writes outputs from the shared tile before the warps that own those rows have staged them",
    ),
]
