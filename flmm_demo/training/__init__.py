"""Training and evaluating F-LMM heads on referring-segmentation data.

`refer` reads the datasets, `train` fits a head on a frozen LMM, `evaluate` scores it
(cIoU / gIoU, from `metrics`).
"""
