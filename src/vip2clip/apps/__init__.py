"""Applications on top of the pipelines: the prediction server and its page (`serve`) and the offline end-to-end demo
(`demo`)."""
