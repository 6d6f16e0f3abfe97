"""Oracles: independent reference computations (the release's forward pass, literal metric loops, a release-format
checkpoint) that the tests and benchmarks check the package against, like numpy.testing. They import nothing of
vip2clip, so that they can disagree with it; nothing in vip2clip imports them."""
