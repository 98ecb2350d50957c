"""CUDA graphs of the decoder pass.

Within one canvas every denoising step's decoder pass reads the same cache, positions and padding
mask; only the canvas tokens and the self-conditioning input change. On CUDA the pass is captured once
per canvas, on its first step, and replayed on the steps after it: one launch instead of thousands of
small kernels, whose launch cost is most of an eager step at batch 1. The pass asks the device for no
value (a capture would fail if it did; `generate` settles which keys are padding before the capture),
draws no random numbers, and writes the canvas's keys and values into cache slots that stay put for the
whole canvas.

A canvas's first step has no self-conditioning input. The graph always has one, with a per-row mask: a
mask of zeros zeroes the soft embeddings, and with them the self-conditioning MLP's output, exactly, so
the first step's numbers are those of the pass without it, and a mask of ones leaves the input as it is.

Captures run on one side stream per device. The first one follows an eager pass on that stream, so that
lazy initialisations (cuBLAS's per-stream workspace) happen outside the capture; that pass gives its
step's logits. Later captures skip it and replay the fresh graph for their step instead.
"""

from __future__ import annotations

from typing import Callable

import torch

# run(canvas tokens, self-conditioning logits or None, self-conditioning mask or None) -> logits
Pass = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def captures(device: torch.device) -> bool:
    """Whether decoder passes on `device` are captured."""
    return device.type == "cuda"


# Per device, the stream captures run on, once it has run the eager pass the first capture needs.
_WARM_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


class DecoderGraph:
    """One decoder pass captured for one canvas, with the buffers it reads its inputs from and writes its
    logits to."""

    def __init__(self, graph: torch.cuda.CUDAGraph, canvas: torch.Tensor, self_conditioning_logits: torch.Tensor,
                 self_conditioning_mask: torch.Tensor, logits: torch.Tensor):
        self.graph = graph
        self.canvas = canvas
        self.self_conditioning_logits = self_conditioning_logits
        self.self_conditioning_mask = self_conditioning_mask
        self.logits = logits

    @classmethod
    def capture(cls, run: Pass, canvas: torch.Tensor, self_conditioning_logits: torch.Tensor,
                self_conditioning_mask: torch.Tensor) -> tuple[DecoderGraph, torch.Tensor]:
        """The graph, reading from the tensors given, and this pass's logits."""
        inputs = (canvas, self_conditioning_logits, self_conditioning_mask)
        # The model's device, which need not be the current one: its streams are the ones to order by.
        with torch.cuda.device(canvas.device):
            side = _WARM_STREAMS.get(canvas.device)
            first_logits = None
            if side is None:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    first_logits = run(*inputs)
                first_logits.record_stream(torch.cuda.current_stream())
            side.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            try:
                # What `torch.cuda.graph` does, less its synchronisation of the device and its emptying of the
                # allocator's cache: once per canvas, those would idle the device and hand the sampler's
                # vocabulary-sized buffers back to the driver, to be allocated from it again.
                with torch.cuda.stream(side):
                    graph.capture_begin()
                    try:
                        logits = run(*inputs)
                    finally:
                        graph.capture_end()
            except RuntimeError as error:
                raise RuntimeError(f"capturing the decoder pass in a CUDA graph failed ({error}); pass "
                                   "cuda_graphs=False to generate to run it eagerly") from error
            _WARM_STREAMS[canvas.device] = side
            torch.cuda.current_stream().wait_stream(side)
            if first_logits is None:
                graph.replay()
                first_logits = logits
        return cls(graph, *inputs, logits), first_logits

    def __call__(self, canvas: torch.Tensor, self_conditioning_logits: torch.Tensor) -> torch.Tensor:
        self.canvas.copy_(canvas)
        self.self_conditioning_logits.copy_(self_conditioning_logits)
        self.graph.replay()
        return self.logits


class CanvasPasses:
    """The decoder passes of one canvas: eager, or with `capture`, captured in a CUDA graph on the first
    pass and replayed after it. `self_conditioning` is the vocabulary size and dtype of the
    self-conditioning input, for the blank one a captured first step reads.

    A replayed pass's logits are the graph's own buffer, valid until the next pass: what the caller keeps
    past it goes through `keep`."""

    def __init__(self, run: Pass, capture: bool, self_conditioning: tuple[int, torch.dtype]):
        self.run = run
        self.capture = capture
        self.vocab_size, self.dtype = self_conditioning
        self.graph: DecoderGraph | None = None

    def __call__(self, current: torch.Tensor, self_conditioning_logits: torch.Tensor | None) -> torch.Tensor:
        if not self.capture:
            return self.run(current, self_conditioning_logits, None)
        if self.graph is None:
            batch, length = current.shape
            if self_conditioning_logits is None:
                logits = torch.zeros(batch, length, self.vocab_size, dtype=self.dtype, device=current.device)
                mask = torch.zeros(batch, dtype=self.dtype, device=current.device)
            else:
                logits = self_conditioning_logits.clone()
                mask = torch.ones(batch, dtype=self.dtype, device=current.device)
            self.graph, first_logits = DecoderGraph.capture(self.run, current.clone(), logits, mask)
            # Every later step has an input to use, even if the captured first step had none: set once,
            # queued after the step that read the zeros.
            mask.fill_(1)
            return first_logits
        return self.graph(current, self_conditioning_logits)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, or a copy of it where it is the graph's logits buffer (as the self-conditioning input
        of a float32 model without temperature is), which the next replay overwrites."""
        buffer = None if self.graph is None else self.graph.logits.untyped_storage().data_ptr()
        return tensor.clone() if tensor.untyped_storage().data_ptr() == buffer else tensor
