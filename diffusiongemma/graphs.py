"""CUDA graphs of the decoder pass.

Within one canvas every denoising step's decoder pass reads the same cache, positions and padding
mask; only the canvas tokens and the self-conditioning logits change. On CUDA the pass is captured once
per canvas, on its first step with self-conditioning, and replayed on the steps after it: one launch
instead of thousands of small kernels, whose launch cost is most of an eager step at batch 1. The pass
asks the device for no value (a capture would fail if it did), draws no random numbers, and writes the
canvas's keys and values into cache slots that stay put for the whole canvas.

Captures run on one side stream per device. The first one follows an eager pass on that stream, so that
lazy initialisations (cuBLAS's per-stream workspace) happen outside the capture; that pass gives its
step's logits. Later captures skip it and replay the fresh graph for their step instead: a replay rather
than a whole eager pass per canvas.
"""

from __future__ import annotations

from typing import Callable

import torch

Pass = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def captures(device: torch.device) -> bool:
    """Whether decoder passes on `device` are captured."""
    return device.type == "cuda"


# Per device, the stream captures run on, once it has run the eager pass the first capture needs.
_WARM_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


class DecoderGraph:
    """One decoder pass captured for one canvas: `run(canvas, self_conditioning_logits)` gives the logits."""

    def __init__(self, graph: torch.cuda.CUDAGraph, canvas: torch.Tensor, self_conditioning_logits: torch.Tensor,
                 logits: torch.Tensor):
        self.graph = graph
        # The addresses the capture saw: replays read their inputs from here and write their logits here.
        self.canvas = canvas
        self.self_conditioning_logits = self_conditioning_logits
        self.logits = logits

    @classmethod
    def capture(cls, run: Pass, canvas: torch.Tensor,
                self_conditioning_logits: torch.Tensor) -> tuple[DecoderGraph, torch.Tensor]:
        """The graph, and this pass's logits."""
        # The model's device, which need not be the current one: its streams are the ones to order by.
        with torch.cuda.device(canvas.device):
            canvas, self_conditioning_logits = canvas.clone(), self_conditioning_logits.clone()
            side = _WARM_STREAMS.get(canvas.device)
            first_logits = None
            if side is None:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    first_logits = run(canvas, self_conditioning_logits)
                first_logits.record_stream(torch.cuda.current_stream())
            side.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=side):
                    logits = run(canvas, self_conditioning_logits)
            except RuntimeError as error:
                raise RuntimeError(f"capturing the decoder pass in a CUDA graph failed ({error}); pass "
                                   "cuda_graphs=False to generate to run it eagerly") from error
            _WARM_STREAMS[canvas.device] = side
            torch.cuda.current_stream().wait_stream(side)
            if first_logits is None:
                graph.replay()
                first_logits = logits
        return cls(graph, canvas, self_conditioning_logits, logits), first_logits

    def __call__(self, canvas: torch.Tensor, self_conditioning_logits: torch.Tensor) -> torch.Tensor:
        self.canvas.copy_(canvas)
        self.self_conditioning_logits.copy_(self_conditioning_logits)
        self.graph.replay()
        return self.logits


class CanvasPasses:
    """The decoder passes of one canvas, `run(canvas tokens, self-conditioning logits)`: eager, or with
    `capture`, captured in a CUDA graph on the first pass with self-conditioning and replayed after it.

    A replayed pass's logits are the graph's own buffer, valid until the next pass: what the caller keeps
    past it goes through `keep`."""

    def __init__(self, run: Pass, capture: bool):
        self.run = run
        self.capture = capture
        self.graph: DecoderGraph | None = None

    def __call__(self, current: torch.Tensor, self_conditioning_logits: torch.Tensor | None) -> torch.Tensor:
        if not self.capture or self_conditioning_logits is None:
            return self.run(current, self_conditioning_logits)
        if self.graph is None:
            self.graph, logits = DecoderGraph.capture(self.run, current, self_conditioning_logits)
            return logits
        return self.graph(current, self_conditioning_logits)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, or a copy of it where it is the graph's logits buffer (as the self-conditioning input
        of a model without temperature is), which the next replay overwrites."""
        buffer = None if self.graph is None else self.graph.logits.untyped_storage().data_ptr()
        return tensor.clone() if tensor.untyped_storage().data_ptr() == buffer else tensor
