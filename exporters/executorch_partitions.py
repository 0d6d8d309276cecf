"""ExecuTorch's partition step with the graph sorted once, not once per partition.

`to_edge_transform_and_lower` cuts the XNNPACK partitions out of the graph one after another
(executorch.exir.backend.backend_api._create_partitions_in_graph_module), and after each cut
`create_submodule_from_nodes` sorts the whole graph topologically again (torch.fx's
`legalize_graph`: a copy of every node, then a recompile of the module's code). The default
model's int4 graph has 272 partitions, one per run of delegable ops between the ops XNNPACK
does not take (the block sums of the int4 correction, the RMSNorm means, the cache updates,
the attention), so the graph was copied 272 times: measured alone on the 2-core Intel Xeon,
the lowering took 269 s with it and 184 s without it, the sort's share of the partition step
falling from 65 s to 1.5 s, and the two programs' logits were bit-identical.

While `partitions_sorted_once()` is active, each cut skips the sort (the function's own
`skip_legalize_graph`, which ExecuTorch's own quantized-op replacement passes too) and the
graph is sorted once after the last cut; the call nodes of the new submodules are then looked
up again by name, as ExecuTorch itself does at that point (its comment: nodes may be replaced
by later edits, their names stay). Only with the ExecuTorch release whose code this was
checked against (CHECKED_VERSION): any other one lowers exactly as it comes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

CHECKED_VERSION = "1.5.1"


def applies() -> bool:
    """Whether the installed ExecuTorch is the release this change was checked against."""
    try:
        return version("executorch") == CHECKED_VERSION
    except PackageNotFoundError:
        return False


@contextlib.contextmanager
def partitions_sorted_once() -> Iterator[None]:
    """While active, ExecuTorch's partition step sorts each graph once after its last cut."""
    if not applies():
        yield
        return
    from executorch.exir.backend import backend_api
    from torch.fx.passes.tools_common import legalize_graph

    cut_and_sort = backend_api.create_submodule_from_nodes
    create_partitions = backend_api._create_partitions_in_graph_module
    cutting = 0  # partition steps under way (control-flow submodules nest them)

    def cut(graph_module: Any, node_list: Any, tag: str, skip_legalize_graph: bool = False) -> Any:
        return cut_and_sort(graph_module, node_list, tag, skip_legalize_graph=skip_legalize_graph or cutting > 0)

    def create_then_sort(graph_module: Any, *args: Any, **kwargs: Any) -> dict[str, list[Any]]:
        nonlocal cutting
        cutting += 1
        try:
            created = create_partitions(graph_module, *args, **kwargs)
        finally:
            cutting -= 1
        if not created:
            return created
        legalize_graph(graph_module)  # new Node objects: find the submodule calls again by name
        targets = {backend: {node.target for node in nodes} for backend, nodes in created.items()}
        return {
            backend: [node for node in graph_module.graph.nodes if node.op == "call_module" and node.target in names]
            for backend, names in targets.items()
        }

    backend_api.create_submodule_from_nodes = cut
    backend_api._create_partitions_in_graph_module = create_then_sort
    try:
        yield
    finally:
        backend_api.create_submodule_from_nodes = cut_and_sort
        backend_api._create_partitions_in_graph_module = create_partitions
