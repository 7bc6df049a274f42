"""`audit`: play the adversary against a served (or exported) classifier.

Query it as a black box, train knockoff students with a battery of knowledge-distillation attacks and a
label-smoothing reference student, and say whether the model is undistillable (docs/design.md §3, §4).
"""

REPORT_SCHEMA_VERSION = 2
