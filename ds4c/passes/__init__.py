"""IR -> IR passes, the PassManager and its instruments."""

from ds4c.passes.manager import (
    PIPELINES,
    Instrument,
    Pass,
    PassContext,
    PassManager,
    get_pass,
    get_pipeline,
    list_passes,
    register_pass,
)

__all__ = ["PIPELINES", "Instrument", "Pass", "PassContext", "PassManager", "get_pass", "get_pipeline",
           "list_passes", "register_pass"]
