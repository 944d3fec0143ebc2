"""The decode step captured once per bucket and replayed (CUDA), and the check that a step is capturable at all
(any device): torch dynamo traces it as one graph, with no break and no host synchronisation."""
from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)


class CapturedSteps:
    """One CUDA graph per (batch bucket, KV-span bucket) of ``step`` (a ``DecodeStep`` on the counter path, choosing
    among ``candidates``), each with its own input buffers; ``run`` copies the inputs in, replays, and returns the outputs. Captured at start-up:
    capturing lazily would stall a serving step for the capture."""

    def __init__(self, step, hidden_size: int, dtype, device, candidates: int):
        self.step, self.hidden_size, self.dtype, self.device = step, hidden_size, dtype, device
        self.candidates = candidates
        self.graphs: dict = {}
        self.pool = None  # one memory pool shared by all graphs (they never run at once)

    def capture(self, batch_buckets, span_buckets) -> None:
        for batch in batch_buckets:
            for span in span_buckets:
                self._capture(batch, span)
        log.info("captured %d decode-step graphs (batches %s, KV spans %s blocks)", len(self.graphs),
                 list(batch_buckets), list(span_buckets))

    def _capture(self, batch: int, span: int) -> None:
        rows = torch.full((batch,), self.step.scratch_row, dtype=torch.long, device=self.device)
        text = torch.zeros(batch, self.hidden_size, dtype=self.dtype, device=self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisation happens outside the graph
                self.step(rows, text, span, candidates=self.candidates)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.step(rows, text, span, candidates=self.candidates)
        self.pool = graph.pool()
        self.graphs[(batch, span)] = (graph, rows, text, outputs)

    def run(self, rows: torch.Tensor, text: torch.Tensor, span: int):
        graph, rows_in, text_in, (frames, tokens) = self.graphs[(rows.shape[0], span)]
        rows_in.copy_(rows)
        text_in.copy_(text)
        graph.replay()
        return frames, tokens


def traces_as_one_graph(step, *arguments) -> Optional[str]:
    """Trace ``step`` with dynamo (``fullgraph=True``: a graph break or a host synchronisation is an error) and run
    it once on ``arguments``; None when it traced, else why not."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(step.__call__, fullgraph=True, backend="eager", dynamic=False)
    try:
        compiled(*arguments)
    except Exception as exc:  # dynamo's Unsupported, a graph break, a data-dependent branch
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None
