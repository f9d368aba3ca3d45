//! Worker: leases tasks from the coordinator and runs the compression engine on them.
