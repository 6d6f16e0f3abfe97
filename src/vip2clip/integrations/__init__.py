"""Adapters that let other frameworks run ViP²-CLIP; each needs its own optional extra.

`vip2clip.integrations.anomalib`: `ViP2CLIP`, an anomalib 2.x model (`pip install "vip2clip[anomalib]"`), see
docs/anomalib.md. Importing this package needs none of them.
"""
