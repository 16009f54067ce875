"""Job bodies: train, merge, eval, report (and serve). Each takes the path of a point's config.yaml."""
