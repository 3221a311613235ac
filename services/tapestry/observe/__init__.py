"""What operators see: Prometheus metrics, JSON logs, the round report and the base export."""
