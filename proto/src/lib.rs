//! gRPC definitions of the job and worker services (generated code lands here with the service).
