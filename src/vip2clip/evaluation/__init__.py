"""Evaluation pipeline: per-class evaluation (`evaluate`), the zero-shot protocol and benchmark runner
(`benchmark`) and the result tables (`reports`). The metrics themselves are `vip2clip.metrics`."""
