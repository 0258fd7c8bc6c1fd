"""Spark stages: ingest raw logs, sessionize, build the training tables, synthesize logs.

Each stage is a pure DataFrame transform (``parse_lines``, ``sessionize_events``,
``build_training_tables``) with reading and writing at the edges (``run_*``), so the CLI, the
Airflow DAG and the tests call the same functions.
"""
