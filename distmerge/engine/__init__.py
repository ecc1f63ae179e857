"""Running a plan: Ray session, stateless workers, the writer actor, and the driver."""
