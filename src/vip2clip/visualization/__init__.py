"""Pictures of results: heat-map overlays and input | heat map | ground-truth panels."""
