"""``page_select``: LServe's query-aware page selection (Quest's bound from each logical page's key
min/max, the best physical pages by it), as one op: reference, Pallas GPU and TPU kernels, dispatch."""
from jaxkv.kernels.page_select.api import IMPLEMENTATIONS, page_select
from jaxkv.kernels.page_select.reference import page_scores, page_select_reference, physical_scores

__all__ = ["IMPLEMENTATIONS", "page_scores", "page_select", "page_select_reference", "physical_scores"]
