"""Applications on top of the pipelines: the browser demo server (`serve`) and the offline end-to-end demo (`demo`)."""
