"""The consortium side: study contract, twin sub-model definitions, the Flower coordinator, reports.

It never imports `site_node`: the coordinator has no business with site data.
"""
