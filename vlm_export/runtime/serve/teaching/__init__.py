"""Teaching the running service by example: the teacher and its learning queue."""
