"""Inference pipeline: the `Predictor` (`predictor`), decision thresholds (`calibration`) and runs over files and
folders (`folder_run`)."""
