"""The controller: claims pending jobs, launches exactly one runner per claimed attempt
(a Kubernetes Job, or a local subprocess), watches it, and records the outcome."""
