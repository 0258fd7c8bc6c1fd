"""Great Expectations gates: one suite per table, run on the Spark DataFrames as GX checkpoints."""
