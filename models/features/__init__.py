"""Feature networks for FID/KID (family "features"): classifiers whose penultimate layer gives the features.

Each module has detect()/load() like every family; the descriptor's `extra` is a `models.metrics.FeatureFacts` and
its model maps [B,in_channels,input_size,input_size] in [0,1] to features [B,dim]. Files go in the
`feature_extractors` model folder.
"""
