"""The net: torchvision's VGG made dense (fc6 a 7x7 conv, fc7 a 1x1 conv), its weights,
where and in what precision it runs, and the fused CPU/GPU plan that runs it fast.
"""
