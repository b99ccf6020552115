"""CUDA graphs of a runner's passes: one per pass key, captured into one memory pool, replayed by key.

    graphs = PassGraphs(device, enabled=device.type == "cuda")
    graphs.capture(key, fn, reset)   # at a sequence's start, before its real data (the warm-up runs write junk)
    graphs.run(key, make)            # the key's graph replayed where captured, else make(key)() without one
    graphs.clear()                   # the buffers the graphs read were replaced: capture again

Every tensor a pass reads or writes must be a static buffer of its runner; the graph replays the same kernels on
the same addresses. Off CUDA (enabled False) nothing is captured and every pass runs as itself.
"""

from __future__ import annotations

import gc

import torch


class PassGraphs:
    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if enabled else None
        self.captures = 0  # graphs captured so far, clears included (a test checks that new inputs capture nothing)

    def __contains__(self, key: tuple) -> bool:
        return key in self._graphs

    def __getitem__(self, key: tuple) -> torch.cuda.CUDAGraph:
        return self._graphs[key]

    def keys(self):
        return self._graphs.keys()

    def run(self, key: tuple, make) -> None:
        """Replays the key's graph; without one (off CUDA, or a shape no decoder planned) runs make(key)() itself:
        capturing mid-sequence would let the warm-up runs write over real cache slots."""
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
        else:
            make(key)()

    def capture(self, key: tuple, fn, reset) -> None:
        """Captures fn as the key's graph: two warm-up runs on a side stream (kernels chosen and workspaces allocated
        outside the capture), then the capture; reset() (the runner's positions to 0) before each run."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                reset()
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        reset()
        # No garbage collection inside the capture: freeing another runner's graph there (a reference cycle collected
        # at a random moment) is a CUDA call the capture forbids, and it aborts the process.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                fn()
        finally:
            if gc_was_enabled:
                gc.enable()
        self._graphs[key] = graph
        self.captures += 1

    def clear(self) -> None:
        """Drops every graph. Their memory pool goes with them: capturing into the handle of a pool whose graphs are
        all freed trips an allocator assert (torch 2.11), so a new one is taken."""
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
