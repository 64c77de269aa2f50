"""Lowerings that make a backbone's dense net fast on a device and dtype (a backbone without one
runs its own forward_pooled).

plan: VGG's Plan (oneDNN packed convs with fused ReLU, Winograd for the wide 3x3 convs, fc6/fc7
as GEMMs over pool5 windows); steps: the fused steps it runs; lowered: torchvision's other
convnets lowered in place onto the same steps (BatchNorm folded, ReLU and residual sums fused);
winograd, winograd_kernels: 3x3 convs by Winograd and their compiled tile transforms; onednn:
whether this torch build runs oneDNN's packed ops; heap: giving freed heap pages back between
batches.
"""

from featx.net.plan.onednn import onednn_prepack_works
from featx.net.plan.plan import Plan, conv_kernels, lower_conv

__all__ = ["Plan", "conv_kernels", "lower_conv", "onednn_prepack_works"]
