"""Ray actors and Serve deployments: ingest, dedup, knn, classifier, review
feedback, and the pipeline that wires them."""
