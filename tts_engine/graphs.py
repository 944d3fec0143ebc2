"""Static steps captured once per bucket and replayed (CUDA), and the check that a step is capturable at all
(any device): torch dynamo traces it as one graph, with no break and no host synchronisation. Shared by the
talker's decode step and the codec decoder's step."""
from __future__ import annotations

import functools
import logging
from typing import Callable, Hashable, Optional

import torch

log = logging.getLogger(__name__)


def batch_buckets(limit: int) -> tuple[int, ...]:
    """The sizes a static step pads to: powers of two below ``limit``, then ``limit``."""
    return tuple(sorted({1 << i for i in range(limit.bit_length()) if 1 << i < limit} | {limit}))


def padded_size(size: int, buckets: Optional[tuple[int, ...]]) -> int:
    """The smallest bucket that holds ``size`` (``size`` itself without buckets, or beyond the largest)."""
    return next((bucket for bucket in buckets or () if bucket >= size), size)


class CapturedGraphs:
    """One CUDA graph per bucket of a static step, each over its own input buffers: ``run`` copies the inputs in,
    replays, and returns the step's outputs (the same tensors every replay: read them before the next). Capture
    before serving: capturing lazily would stall a serving step for the capture."""

    def __init__(self):
        self.graphs: dict = {}
        self.pool = None  # one memory pool shared by all graphs (they never run at once)

    def __contains__(self, bucket: Hashable) -> bool:
        return bucket in self.graphs

    def capture(self, bucket: Hashable, step: Callable, *example_inputs: torch.Tensor) -> None:
        """Capture ``step(*inputs)`` for ``bucket``; ``example_inputs`` give the buffers' shapes and must be valid
        (the step runs twice on them before capture, so lazy initialisation happens outside the graph)."""
        inputs = tuple(x.clone() for x in example_inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = step(*inputs)
        self.pool = graph.pool()
        self.graphs[bucket] = (graph, inputs, outputs)

    def run(self, bucket: Hashable, *inputs: torch.Tensor):
        graph, buffers, outputs = self.graphs[bucket]
        for buffer, value in zip(buffers, inputs):
            buffer.copy_(value)
        graph.replay()
        return outputs


def capture_talker_steps(step, batch_buckets, span_buckets, hidden_size: int, dtype, device,
                         candidates: int) -> CapturedGraphs:
    """The talker's decode step (counter noise, choosing among ``candidates``) captured per (batch, KV span)."""
    graphs = CapturedGraphs()
    for batch in batch_buckets:
        rows = torch.full((batch,), step.scratch_row, dtype=torch.long, device=device)
        text = torch.zeros(batch, hidden_size, dtype=dtype, device=device)
        for span in span_buckets:
            graphs.capture((batch, span), functools.partial(_talker_step, step, span, candidates), rows, text)
    log.info("captured %d decode-step graphs (batches %s, KV spans %s blocks)", len(graphs.graphs),
             list(batch_buckets), list(span_buckets))
    return graphs


def _talker_step(step, span: int, candidates: int, rows: torch.Tensor, text: torch.Tensor):
    return step(rows, text, span, candidates=candidates)


def traced_once(step: Callable, *arguments) -> tuple[Optional[str], object]:
    """Trace ``step`` with dynamo (``fullgraph=True``: a graph break or a host synchronisation is an error) and run
    it once on ``arguments``: (None, its outputs) when it traced as one graph, else (why not, None)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: step(*args), fullgraph=True, backend="eager", dynamic=False)
    try:
        return None, compiled(*arguments)
    except Exception as exc:  # dynamo's Unsupported, a graph break, a data-dependent branch
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", None
