"""The net: backbones made dense (featx.net.backbones: VGG, fc6 a 7x7 conv and fc7 a 1x1 conv),
their weights, where and in what precision they run (device), and the lowered plans that run
them fast (featx.net.plan).
"""
