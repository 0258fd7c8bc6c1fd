"""Shared platform code every stage stands on: settings, the table catalogue, atomic
publishing, structured logging, the Spark session and the `funnelrec` CLI.
Deployment notes (Spark cluster, MLflow server, Airflow workers) live in infra/README.md."""
