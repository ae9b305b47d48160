"""Mixed precision: one per-layer precision policy, sensitivity, the budgeted search, recipes.

- ``policy``: what each node runs in (overrides by name, pattern, op type; then the automatic
  assignment; then the default), and which precisions a target offers.
- ``budget``: the accuracy budget (``cosine>=0.999``, ``sqnr>=35``, ``top1-drop<=0.5``, or a callable).
- ``ranges``: one calibration, many candidate models (activation ranges by tensor).
- ``evaluate``: batched onnxruntime runs of candidate models on a fixed set of feeds.
- ``sensitivity``: the SQNR each layer's quantization costs, cached beside the calibration cache.
- ``cost``: measured latency and size of keeping a layer float.
- ``regions``: the float-region graph (networkx) that keeps promoted layers contiguous.
- ``search``: greedy promotion by gain per cost, then a demotion sweep; the Pareto front.
- ``recipe``: the chosen assignment saved as JSON and replayed exactly.
- ``plot``: the Pareto front as a table and an SVG.
"""
