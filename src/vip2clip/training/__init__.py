"""Training pipeline: the release's loop (`loop`), the frozen-feature cache (`feature_cache`) and losses (`losses`)."""
