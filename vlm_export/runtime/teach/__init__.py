"""Teach by example: labelled frames in a database, an exact online RAIL learner over them, the
fusion of its output into the decisions, and thresholds chosen from leave-one-out predictions."""
