//! Coordinator: job API, planner, task leasing and finalizer (the only database client).
