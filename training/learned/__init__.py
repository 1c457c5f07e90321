"""The learned core's pipelines: verification traces, alignment and acceptance-predictor training and evaluation."""
