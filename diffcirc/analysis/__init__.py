"""The circuit study on top of the processor layer.

driver      runs the model: traces, ablations, attribution, role ablations, circuit -> tables
image_maps  edge / texture maps of images and role-relevant errors of predicted x0
metrics     entropy profiles, complexity ratio, entropy divergence, degradation, attribution agreement
roles       head features and the eight role rules
circuit     greedy minimal circuit
significance the significance tests (scipy), usable on saved tables
summary     summary.json from saved tables
"""
